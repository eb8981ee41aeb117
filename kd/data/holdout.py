"""The splits' roles when tuning. Selection (the best epoch, and every trial's score) uses "val"; the numbers
reported use "test", which tuning never reads. Without a test/ folder a stratified share of train/ is held out
to select, and the user's val/ reports; every run of such an experiment trains on the rest of train/."""
from __future__ import annotations

import dataclasses

import torch

from kd.data.batches import ImageData, Split
from kd.errors import UserError


def _subset(split: Split, index: torch.Tensor) -> Split:
    return Split(torch.utils.data.Subset(split.files, index.tolist()), split.labels[index],
                 None if split.images is None else split.images[index])


def hold_out(data: ImageData, fraction: float, seed: int) -> ImageData:
    """`data` with `fraction` of each class's train/ images (drawn with `seed`) as the selection split "val",
    train/'s other images as "train", and val/ as the reporting split "test"."""
    labels = data.splits["train"].labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    held, kept = [], []
    for label, name in enumerate(data.class_names):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(fraction * len(members))
        if count < 1 or count >= len(members):
            raise UserError(f"holding out {fraction:g} of train/ for selection leaves class '{name}' ({len(members)} "
                            "train images) without a selection or a training image: add train images, change "
                            "tune.holdout_fraction or add a test/ folder (then val/ selects and test/ reports)")
        held.append(members[:count])
        kept.append(members[count:])
    train = data.splits["train"]
    splits = {"train": _subset(train, torch.cat(kept).sort().values),
              "val": _subset(train, torch.cat(held).sort().values), "test": data.splits["val"]}
    return dataclasses.replace(data, splits=splits, held_out=f"{fraction:g} of train/ (stratified, seed {seed})")


def without_reporting(data: ImageData) -> ImageData:
    """`data` as a tuning trial sees it: no reporting split, so that nothing in a trial can read it."""
    return dataclasses.replace(data, splits={name: split for name, split in data.splits.items() if name != "test"})


def split_roles(data: ImageData, tuning: bool) -> str:
    """The plan's line on which images train, select and report."""
    counts = data.counts
    if data.held_out:
        return (f"splits: training on train/ less its held-out {data.held_out} ({counts['train']} images); "
                f"selection (best epoch{', every trial' if tuning else ''}) on the held-out images ({counts['val']}); "
                f"reporting on val/ ({counts['test']}), never read while tuning")
    reporting = f"reporting on test/ ({counts['test']})" if "test" in counts else "no test/: val/ is also reported"
    return (f"splits: training on train/ ({counts['train']}); selection (best epoch{', every trial' if tuning else ''})"
            f" on val/ ({counts['val']}); {reporting}{', never read while tuning' if tuning else ''}")
