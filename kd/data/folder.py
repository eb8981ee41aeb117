"""The image folder: its train/val/test layout checked, the images listed per split with their labels, and a
fingerprint that changes when the images do."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kd.errors import UserError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
SPLITS = ("train", "val", "test")
LAYOUT_HINT = "expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (optional {root}/test/)"


def _layout_error(problem: str, root: Path) -> UserError:
    return UserError(f"{problem}: {LAYOUT_HINT.format(root=root)}; or try the built-in demo: "
                     "python run_experiment.py --demo")


def _is_image(path: Path, folder: Path) -> bool:
    """An image file not hidden itself nor inside a hidden folder (.ipynb_checkpoints, ...)."""
    hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
    return path.is_file() and not hidden and path.suffix.lower() in IMAGE_EXTENSIONS


@dataclass
class SplitFiles:
    samples: list[tuple[Path, int]]
    ignored: int  # hidden or non-image files that were skipped


def scan_dataset(root: Path) -> tuple[list[str], dict[str, SplitFiles]]:
    """Check the ImageFolder layout under `root` and list (path, label) for each split present."""
    root = Path(root)
    if not root.is_dir():
        raise _layout_error(f"data folder '{root}' not found", root)
    for required in ("train", "val"):
        if not (root / required).is_dir():
            raise _layout_error(f"data folder '{root}' has no {required}/ folder", root)
    class_sets: dict[str, list[str]] = {}
    for split in SPLITS:
        if (root / split).is_dir():
            class_sets[split] = sorted(d.name for d in (root / split).iterdir()
                                       if d.is_dir() and not d.name.startswith("."))
    classes = class_sets["train"]
    if len(classes) < 2:
        raise UserError(f"{root / 'train'} has {len(classes)} class folder(s): at least 2 are needed, "
                        "one folder per class")
    for split, names in class_sets.items():
        if names != classes:
            only_train = sorted(set(classes) - set(names))
            only_here = sorted(set(names) - set(classes))
            raise UserError(f"train and {split} class folders differ: only in train: "
                            f"{', '.join(only_train) or '-'}; only in {split}: {', '.join(only_here) or '-'}; "
                            "make the class folders match")
    splits = {}
    for split in class_sets:
        samples, ignored = [], 0
        for label, name in enumerate(classes):
            folder = root / split / name
            entries = sorted(folder.rglob("*"))
            images = [p for p in entries if _is_image(p, folder)]
            ignored += sum(1 for p in entries if p.is_file()) - len(images)
            if not images:
                raise UserError(f"class folder '{folder}' holds no images: add images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder")
            samples += [(p, label) for p in images]
        splits[split] = SplitFiles(samples, ignored)
    return classes, splits



def fingerprint(root: Path, splits: dict[str, SplitFiles]) -> str:
    digest = hashlib.sha256()
    for name, files in splits.items():
        for path, label in files.samples:
            digest.update(f"{name}/{path.relative_to(root)}:{label}:{path.stat().st_size}\n".encode())
    return digest.hexdigest()[:16]
