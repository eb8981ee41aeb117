"""CIFAR-10 and CIFAR-100 as the published tables use them (`--data cifar100:DIR`), read through torchvision's
own datasets: the official 10k test set reports, and a stratified share of the 50k training images (fixed
seed) is the val split where the best epoch is chosen. Files in the same format that are not the official ones
(a relabelled CIFAR, the tests' tiny file) are read too, with a warning, and the data says so."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torchvision
from torchvision.datasets.utils import check_integrity

from kd.data.batches import ImageData, Split
from kd.data.holdout import stratified
from kd.data.load import channel_stats
from kd.errors import UserError

log = logging.getLogger("kd")

DATASETS = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
IMAGE_SIZE = 32
VAL_SEED = 0  # the val images drawn from the training set: the same in every experiment


def cifar_name(data_dir: str) -> str | None:
    """"cifar100" for "cifar100:DIR" (likewise cifar10); None for an image folder."""
    name, sep, _ = str(data_dir).partition(":")
    return name.lower() if sep and name.lower() in DATASETS else None


def unchecked(dataset: type) -> type:
    """The dataset class reading the same files without comparing their checksums (ours are compared apart)."""
    return type(f"Unchecked{dataset.__name__}", (dataset,), {
        "train_list": [[name, None] for name, _ in dataset.train_list],
        "test_list": [[name, None] for name, _ in dataset.test_list],
        "meta": {**dataset.meta, "md5": None}})


def _files(dataset: type, root: Path) -> list[tuple[Path, str]]:
    folder = root / dataset.base_folder
    return [(folder / name, md5) for name, md5 in [*dataset.train_list, *dataset.test_list,
                                                   [dataset.meta["filename"], dataset.meta["md5"]]]]


def _download(name: str, dataset: type, root: Path) -> None:
    """torchvision's own download (and checksum) into `root`; offline, one line naming the file and the folder."""
    try:
        dataset(str(root), train=True, download=True)
    except Exception as err:  # noqa: BLE001 - urllib's, ssl's and torchvision's errors alike: say why in one line
        raise UserError(f"{name} is not in '{root}' (no {root / dataset.base_folder}/) and could not be downloaded "
                        f"({str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__}): "
                        f"put {dataset.filename} from {dataset.url} into '{root}' and extract it there") from None


def _split(images: torch.Tensor, labels: torch.Tensor) -> Split:
    return Split(torch.utils.data.TensorDataset(images, labels), labels, images)


def load_cifar(data_dir: str, image_size: int | str, hflip: bool, val_images: int) -> ImageData:
    """The CIFAR set that `data_dir` ("cifar100:DIR") names, in memory: train less `val_images` (stratified),
    val, and the official test set."""
    name = cifar_name(data_dir)
    dataset, root = DATASETS[name], Path(str(data_dir).split(":", 1)[1] or ".").expanduser()
    if image_size not in ("auto", IMAGE_SIZE):
        raise UserError(f"{name} images are {IMAGE_SIZE} px: set experiment.image_size to auto or {IMAGE_SIZE} "
                        f"(now {image_size})")
    files = _files(dataset, root)
    if not all(path.exists() for path, _ in files):
        _download(name, dataset, root)
    official = all(check_integrity(str(path), md5) for path, md5 in files)
    if not official:
        log.warning("%s is not the official %s (its checksum differs): its results are not comparable with the "
                    "published tables", root / dataset.base_folder, name)
    reader = unchecked(dataset)
    try:
        train, test = reader(str(root), train=True), reader(str(root), train=False)
    except Exception as err:  # noqa: BLE001 - a damaged pickle: whatever unpickling raises
        raise UserError(f"'{root / dataset.base_folder}' does not hold readable {name} files ({type(err).__name__}): "
                        "download them again") from None
    as_tensors = lambda part: (torch.from_numpy(part.data).permute(0, 3, 1, 2).contiguous(),  # noqa: E731
                               torch.tensor(part.targets))
    (train_images, train_labels), (test_images, test_labels) = as_tensors(train), as_tensors(test)
    val, kept = stratified(train_labels, list(train.classes), val_images / len(train_labels), VAL_SEED,
                           f"the {name} training set for val (experiment.cifar_val_images)")
    splits = {"train": _split(train_images[kept], train_labels[kept]),
              "val": _split(train_images[val], train_labels[val]), "test": _split(test_images, test_labels)}
    mean, std = channel_stats(splits["train"])
    digest = hashlib.sha256()
    for path, _ in files:
        digest.update(path.read_bytes())
    return ImageData(root, list(train.classes), IMAGE_SIZE, splits, mean, std, hflip, 0, 0,
                     f"{name}:{val_images}:{digest.hexdigest()[:16]}", official=official)
