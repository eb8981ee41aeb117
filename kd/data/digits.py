"""The demo's data: scikit-learn's bundled handwritten digits exported as an image folder."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from kd.errors import UserError


def export_digits_demo(root: str | Path) -> Path:
    """Write scikit-learn's bundled digits as PNGs into root/{train,val,test}/<digit>/ (once).

    Stratified 60/20/20 split with a fixed seed; written to a temporary folder and renamed, so an
    interrupted export never leaves a half-written data set behind.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    index = np.arange(len(pixels))
    train_idx, rest = train_test_split(index, test_size=0.4, stratify=digits.target, random_state=0)
    val_idx, test_idx = train_test_split(rest, test_size=0.5, stratify=digits.target[rest], random_state=0)
    if root.exists() and any(root.iterdir()):
        raise UserError(f"demo folder '{root}' exists but is not a complete export (no train/ and val/): "
                        "move it away and run --demo again")
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for split, ids in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in ids:
            folder = staging / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i], mode="L").save(folder / f"digit_{i:04d}.png")
    if root.exists():
        root.rmdir()
    os.replace(staging, root)
    return root
