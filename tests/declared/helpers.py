"""Tiny user tasks written to a folder: two CSV text tasks and one image-folder task, declared in YAML."""
import csv
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

TEXT_YAML = """\
tasks:
  - name: mood                 # binary sentiment, one pool split by the seeded rule
    path: mood.csv
    text: sentence
    label: feeling
    split: {validation: 12, test: 12}
  - name: topic                # 3 topics, label names given, macro-F1
    path: topic.csv
    labels: [sports, tech, food]
    split: {validation: 12, test: 12, seed: 1}
    metric: macro_f1
"""

IMAGE_YAML = """\
name: shapes
path: shapes                   # shapes/<class>/<image>.png
split: {validation: 6, test: 6}
templates: ["a photo of a {c}.", "a picture of a {c}."]
"""


def write_text_tasks(root: Path, n: int = 72) -> Path:
    rng = random.Random(0)
    words = {"happy": ["great", "lovely", "wonderful", "good"], "sad": ["awful", "bad", "terrible", "boring"],
             "sports": ["match", "goal", "team", "score"], "tech": ["laptop", "code", "chip", "software"],
             "food": ["pasta", "bread", "soup", "cheese"]}
    filler = ["the", "a", "it", "was", "really", "today", "this", "one", "very", "quite"]

    def sentence(label, i):
        return " ".join(rng.sample(filler, 3) + rng.sample(words[label], 2) + [f"no{i}"])

    root.mkdir(parents=True, exist_ok=True)
    for name, header, labels in (("mood", ("sentence", "feeling"), ["happy", "sad"]),
                                 ("topic", ("text", "label"), ["sports", "tech", "food"])):
        with open(root / f"{name}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i in range(n):
                label = labels[i % len(labels)]
                w.writerow([sentence(label, i), label])
    (root / "tasks.yaml").write_text(TEXT_YAML)
    return root / "tasks.yaml"


def write_image_task(root: Path, per_class: int = 16) -> Path:
    from PIL import Image

    g = random.Random(0)
    for cls, base in (("circle", (220, 40, 40)), ("square", (40, 40, 220))):
        (root / "shapes" / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.new("RGB", (32, 32), tuple(min(255, max(0, c + g.randint(-30, 30))) for c in base))
            im.putpixel((i % 32, (3 * i) % 32), (g.randint(0, 255),) * 3)  # every image distinct
            im.save(root / "shapes" / cls / f"{i:02d}.png")
    (root / "images.yaml").write_text(IMAGE_YAML)
    return root / "images.yaml"


def run_script(script: str, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / script), *overrides], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def outputs(tmp: Path) -> list[str]:
    """The overrides that put every output under ``tmp`` (Hydra's own log folder too)."""
    return [f"paths.checkpoints={tmp}/ck", f"paths.results={tmp}/res", f"hydra.run.dir={tmp}/hydra"]
