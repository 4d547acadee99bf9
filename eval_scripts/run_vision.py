"""CLIP vision experiments end to end: fine-tune (or import), search each method, write CSV/table/plots.

    python eval_scripts/run_vision.py experiment=tiny_synthetic            # CPU smoke run, minutes
    python eval_scripts/run_vision.py experiment=tall_tsv model=vitb32_open_clip tasks=tall8 method=tsv_m \
        model.path=/ckpt/ViT-B-32/openai.safetensors finetuned.pattern=/ckpt/ViT-B-32/{task}.safetensors \
        finetuned.heads=/ckpt/ViT-B-32/head_{task}.safetensors
    python eval_scripts/run_vision.py experiment=knots setting=joint model.path=/hf/clip-vit-base-patch32

Rows are appended to results/<experiment>.csv; re-running skips points already there.
Config: configs/vision.yaml (docs/vision.md lists the command of every published setting).
"""
from taskmerge.experiments.runner import search_script
from taskmerge.experiments.vision import run

main = search_script("vision", run)

if __name__ == "__main__":
    main()
