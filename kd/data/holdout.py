"""The splits' roles when tuning. Selection (the best epoch, and every trial's score) uses "val"; the numbers
reported use "test", which tuning never reads. Without a test/ folder a stratified share of train/ is held out
to select, and the user's val/ reports; every run of such an experiment trains on the rest of train/."""
from __future__ import annotations

import dataclasses

import torch

from kd.data.batches import ImageData, Split
from kd.errors import UserError


def subset(split: Split, index: torch.Tensor) -> Split:
    """The images of `split` at `index`, in that order."""
    return Split(torch.utils.data.Subset(split.files, index.tolist()), split.labels[index],
                 None if split.images is None else split.images[index])


def stratified(labels: torch.Tensor, class_names: list[str], fraction: float, seed: int, what: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(held, kept): `fraction` of each class's images, drawn with `seed`, and the rest, each in index order.
    Every class must keep at least one image on each side; `what` names the split for the error."""
    generator = torch.Generator().manual_seed(seed)
    held, kept = [], []
    for label, name in enumerate(class_names):
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = round(fraction * len(members))
        if count < 1 or count >= len(members):
            raise UserError(f"holding out {fraction:g} of {what} leaves class '{name}' ({len(members)} images) "
                            "without a held-out or a training image")
        held.append(members[:count])
        kept.append(members[count:])
    return torch.cat(held).sort().values, torch.cat(kept).sort().values


def hold_out(data: ImageData, fraction: float, seed: int) -> ImageData:
    """`data` with `fraction` of each class's train/ images (drawn with `seed`) as the selection split "val",
    train/'s other images as "train", and val/ as the reporting split "test"."""
    train = data.splits["train"]
    try:
        held, kept = stratified(train.labels.cpu(), data.class_names, fraction, seed, "train/ for selection")
    except UserError as err:
        raise UserError(f"{err}: add train images, change tune.holdout_fraction or add a test/ folder (then val/ "
                        "selects and test/ reports)") from None
    splits = {"train": subset(train, kept), "val": subset(train, held), "test": data.splits["val"]}
    return dataclasses.replace(data, splits=splits, held_out=f"{fraction:g} of train/ (stratified, seed {seed})")


def without_reporting(data: ImageData) -> ImageData:
    """`data` as a tuning trial sees it: no reporting split, so that nothing in a trial can read it."""
    return dataclasses.replace(data, splits={name: split for name, split in data.splits.items() if name != "test"})


def split_roles(data: ImageData, tuning: bool) -> str:
    """The plan's line on which images train, select and report."""
    counts = data.counts
    if data.official is not None:  # CIFAR (kd/data/cifar.py)
        return (f"splits: training on the CIFAR training set less {counts['val']} images (stratified, seed 0) "
                f"({counts['train']}); selection (best epoch{', every trial' if tuning else ''}) on those "
                f"{counts['val']}; reporting on the test set ({counts['test']})"
                f"{', never read while tuning' if tuning else ''}"
                f"{'' if data.official else '; not the official files: not comparable with the published tables'}")
    if data.held_out:
        return (f"splits: training on train/ less its held-out {data.held_out} ({counts['train']} images); "
                f"selection (best epoch{', every trial' if tuning else ''}) on the held-out images ({counts['val']}); "
                f"reporting on val/ ({counts['test']}), never read while tuning")
    reporting = f"reporting on test/ ({counts['test']})" if "test" in counts else "no test/: val/ is also reported"
    return (f"splits: training on train/ ({counts['train']}); selection (best epoch{', every trial' if tuning else ''})"
            f" on val/ ({counts['val']}); {reporting}{', never read while tuning' if tuning else ''}")
