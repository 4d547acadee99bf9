"""The vision tasks: torchvision datasets under a user-given root, validation protocols, synthetic images.

``load_task(name, root, protocol)`` returns ``{"train", "validation", "test"}`` image splits and the
class names. Nothing is downloaded (torchvision ``download=False``): a missing dataset raises
``MissingDataError`` naming what to download and where.

Validation protocols (methods.md §7.2):

- ``tall`` (tall_masks / TSV / task-vectors): validation = ``random_split(train, [n−v, v],
  generator=manual_seed(0))`` with ``v = min(int(0.1·n), 5000)``; the rest trains. EuroSAT uses its
  own ``val`` folder. Test = the official test split.
- ``knots``: Cars, GTSRB, MNIST, SUN397, SVHN: validation = the first ``int(0.2·n)`` of a fixed
  permutation of the *test* set, test = the rest; DTD, EuroSAT, RESISC45 use their native val split.
  KnOTS' permutation files (``dataset/shuffled_idxs``) are not available here, so the permutation is
  ``torch.randperm(n, generator=manual_seed(seed))`` (seed 0 by default): the split *sizes* match KnOTS,
  the membership does not (pass KnOTS' own permutation with ``permutation=`` to match it).

``synthetic_task`` makes a learnable image task (class prototypes + noise) for tests and tiny runs.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from taskmerge.data.sources import MissingDataError
from taskmerge.data.vision_tasks import DOWNLOAD_HINTS, EUROSAT_NAMES, FIXED_NAMES, TASKS_20, TEMPLATES

PROTOCOLS = ("tall", "knots")
KNOTS_FROM_TEST = ("Cars", "GTSRB", "MNIST", "SUN397", "SVHN")


class ImageSplit:
    """A split over an indexable dataset of ``(image, label)``; ``batches`` yields ``(images, labels)``."""

    def __init__(self, dataset, indices: Sequence[int] | None = None, transform: Callable | None = None,
                 num_workers: int = 0):
        self.dataset, self.transform, self.num_workers = dataset, transform, num_workers
        self.indices = list(range(len(dataset))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def _item(self, i: int):
        image, label = self.dataset[self.indices[i]]
        return (self.transform(image) if self.transform else image), int(label)

    def batches(self, batch_size: int, order: torch.Tensor | None = None) -> Iterator[tuple]:
        positions = range(len(self)) if order is None else order.tolist()
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(_Positions(self), batch_size=batch_size, sampler=list(positions),
                                                 num_workers=self.num_workers)
            yield from loader
            return
        positions = list(positions)
        for s in range(0, len(positions), batch_size):
            items = [self._item(i) for i in positions[s:s + batch_size]]
            yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])

    def labels(self) -> torch.Tensor:
        return torch.tensor([int(self.dataset[i][1]) for i in self.indices])

    def subset(self, positions: Sequence[int]) -> "ImageSplit":
        return ImageSplit(self.dataset, [self.indices[p] for p in positions], self.transform, self.num_workers)

    def head(self, n: int | None) -> "ImageSplit":
        return self if n is None or n >= len(self) else self.subset(range(n))


class _Positions(torch.utils.data.Dataset):
    def __init__(self, split: ImageSplit):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split._item(i)


# ---------------------------------------------------------------- validation protocols
def tall_validation(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, validation) positions: ``random_split(range(n), [n−v, v], manual_seed(seed))``."""
    v = min(int(0.1 * n), 5000)
    train, val = torch.utils.data.random_split(range(n), [n - v, v], generator=torch.Generator().manual_seed(seed))
    return list(train.indices), list(val.indices)


def knots_validation(n: int, seed: int = 0, permutation: Sequence[int] | None = None) -> tuple[list[int], list[int]]:
    """(validation, test) positions of the test set: the first ``int(0.2·n)`` of a fixed permutation."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() \
        if permutation is None else [int(i) for i in permutation]
    if sorted(perm) != list(range(n)):
        raise ValueError(f"the permutation is not a permutation of range({n})")
    cut = int(0.2 * n)
    return perm[:cut], perm[cut:]


# ---------------------------------------------------------------- torchvision datasets
def _tv(name: str, root: Path, split: str):
    """The torchvision (or ImageFolder) dataset of ``name`` for a native split, and its class names."""
    import torchvision.datasets as D

    r = str(root)
    train = split == "train"
    if name == "Cars":
        ds = D.StanfordCars(r, split="train" if train else "test")
        return ds, ds.classes
    if name == "DTD":
        ds = D.DTD(r, split=split)
        return ds, [c.replace("_", " ") for c in ds.classes]
    if name == "EuroSAT":
        ds = D.ImageFolder(str(root / "EuroSAT_splits" / split))
        return ds, [EUROSAT_NAMES.get(c, c) for c in ds.classes]
    if name == "GTSRB":
        return D.GTSRB(r, split="train" if train else "test"), FIXED_NAMES["GTSRB"]
    if name in ("MNIST", "FashionMNIST", "KMNIST", "CIFAR10", "CIFAR100"):
        ds = getattr(D, name)(r, train=train)
        names = FIXED_NAMES.get(name, ds.classes)
        return ds, [re.sub(r"^\d+ - ", "", c) for c in names]
    if name == "EMNIST":  # FusionBench uses the letters split (unverified for tall_masks)
        ds = D.EMNIST(r, split="letters", train=train)
        return ds, ds.classes
    if name == "RESISC45":
        return _resisc45(root, split)
    if name == "SUN397":  # task-vectors' own split: train/ and val/ (the latter is used as test)
        ds = D.ImageFolder(str(root / "sun397" / ("train" if train else "val")))
        return ds, [re.sub(r"_", " ", c.split("/")[-1].replace("_", " ")) for c in ds.classes]
    if name == "SVHN":
        return D.SVHN(str(root / "svhn"), split="train" if train else "test"), FIXED_NAMES["SVHN"]
    if name == "STL10":
        ds = D.STL10(r, split="train" if train else "test")
        return ds, ds.classes
    if name == "OxfordIIITPet":
        ds = D.OxfordIIITPet(r, split="trainval" if train else "test")
        return ds, ds.classes
    if name in ("Flowers102", "PCAM", "RenderedSST2"):
        ds = getattr(D, name)(r, split=split)
        return ds, FIXED_NAMES[name]
    if name == "FER2013":
        return D.FER2013(r, split="train" if train else "test"), FIXED_NAMES["FER2013"]
    if name == "Food101":
        ds = D.Food101(r, split="train" if train else "test")
        return ds, [c.replace("_", " ") for c in ds.classes]
    raise KeyError(f"unknown vision task {name!r}; known: {', '.join(TASKS_20)}")


def _resisc45(root: Path, split: str):
    from PIL import Image

    base = root / "resisc45"
    listing = base / f"resisc45-{split}.txt"
    images = base / "NWPU-RESISC45"
    if not listing.exists() or not images.exists():
        raise FileNotFoundError(listing)
    files = [ln.strip() for ln in listing.read_text().splitlines() if ln.strip()]
    classes = sorted({f.rsplit("_", 1)[0] for f in files})
    index = {c: i for i, c in enumerate(classes)}
    items = [(images / f.rsplit("_", 1)[0] / f, index[f.rsplit("_", 1)[0]]) for f in files]

    class _Listed(torch.utils.data.Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            path, label = items[i]
            return Image.open(path).convert("RGB"), label

    return _Listed(), [c.replace("_", " ") for c in classes]


def _native(name: str, root: Path, split: str):
    try:
        return _tv(name, root, split)
    except (FileNotFoundError, RuntimeError, OSError) as e:
        raise MissingDataError(
            f"vision task {name} ({split}) not found under {root}: download {DOWNLOAD_HINTS[name]} "
            f"(taskmerge never downloads at run time). Underlying error: {e}") from None


@dataclass
class VisionTask:
    name: str
    classnames: list[str]
    templates: list[str]
    splits: dict[str, ImageSplit]


def load_task(name: str, root: str | Path, protocol: str = "tall", transform: Callable | None = None,
              seed: int = 0, permutation: Sequence[int] | None = None, num_workers: int = 0) -> VisionTask:
    """The three splits of ``name`` under ``protocol`` (see the module docstring)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown validation protocol {protocol!r}; choose one of {PROTOCOLS}")
    if name not in TASKS_20:
        raise KeyError(f"unknown vision task {name!r}; known: {', '.join(TASKS_20)}")
    root = Path(root)
    train_ds, names = _native(name, root, "train")
    split = lambda ds, idx=None: ImageSplit(ds, idx, transform, num_workers)  # noqa: E731
    own_val = {"EuroSAT"} if protocol == "tall" else {"DTD", "EuroSAT", "RESISC45"}
    if name in own_val:
        splits = {"train": split(train_ds), "validation": split(_native(name, root, "val")[0]),
                  "test": split(_native(name, root, "test")[0])}
    elif protocol == "tall":
        tr, va = tall_validation(len(train_ds), seed)
        splits = {"train": split(train_ds, tr), "validation": split(train_ds, va),
                  "test": split(_native(name, root, "test")[0])}
    else:
        test_ds = _native(name, root, "test")[0]
        va, te = knots_validation(len(test_ds), seed, permutation)
        splits = {"train": split(train_ds), "validation": split(test_ds, va), "test": split(test_ds, te)}
    return VisionTask(name, list(names), TEMPLATES[name], splits)


def clip_transform(image_size: int):
    """CLIP's evaluation preprocessing (resize bicubic, centre crop, RGB, normalise)."""
    from torchvision import transforms as T

    from taskmerge.models.clip import CLIP_MEAN, CLIP_STD

    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


# ---------------------------------------------------------------- synthetic images
def synthetic_task(name: str, num_classes: int, image_size: int, sizes: dict[str, int], seed: int = 0,
                   noise: float = 0.6) -> VisionTask:
    """Images = smooth per-class prototype + Gaussian noise; learnable, distinct per task name."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, name)))
    low = torch.randn(num_classes, 3, 4, 4, generator=g)
    protos = torch.nn.functional.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
    splits = {}
    for split, n in sizes.items():
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=g)]
        images = protos[labels] + noise * torch.randn(n, 3, image_size, image_size, generator=g)
        splits[split] = ImageSplit(torch.utils.data.TensorDataset(images, labels))
    classnames = [f"{name.lower()} class {i}" for i in range(num_classes)]
    return VisionTask(name, classnames, ["a photo of a {c}.", "an image of the {c}."], splits)


def num_steps(epochs: float, n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(epochs * n_train / batch_size))


# ---------------------------------------------------------------- declared image tasks
class _DeclaredImages(torch.utils.data.Dataset):
    """``(image, label)`` of a declared image task's split: file paths opened on access, or images."""

    def __init__(self, items: Sequence, labels: Sequence[int]):
        self.items, self.targets = list(items), list(labels)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        item = self.items[i]
        if isinstance(item, (str, Path)):
            with Image.open(item) as im:
                item = im.convert("RGB")
        elif isinstance(item, dict) and item.get("bytes") is not None:  # a datasets Image feature, undecoded
            import io

            item = Image.open(io.BytesIO(item["bytes"])).convert("RGB")
        return item, self.targets[i]


def declared_task(task, transform: Callable | None = None, num_workers: int = 0) -> VisionTask:
    """A ``VisionTask`` from a declared image task (``data.declared.TaskData``): class names = its label
    names, prompts = its ``templates`` (default ``a photo of a {c}.``)."""
    splits = {s: ImageSplit(_DeclaredImages(*task.splits[s]), None, transform, num_workers) for s in task.splits}
    return VisionTask(task.name, list(task.labels), list(task.templates), splits)
