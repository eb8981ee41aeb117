"""Data layer: layout checks, image decoding, auto image size, batches and augmentation, digits demo."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data.batches import ImageData, Split
from kd.data.decode import AUTO_SIZE_RANGE, auto_image_size, decode, load_rgb
from kd.data.digits import export_digits_demo
from kd.data.folder import scan_dataset
from kd.data.load import channel_stats, load_image_data
from kd.engine import distributed
from kd.engine.run import tensor_digest
from kd.errors import UserError

CPU = torch.device("cpu")


# --- layout checks ---------------------------------------------------------------------------------

def test_missing_root_names_folder_and_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError) as info:
        scan_dataset(missing)
    message = str(info.value)
    assert "not found" in message and str(missing) in message
    assert "train/<class>" in message and "--demo" in message
    assert "\n" not in message


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_required_split(tmp_path, make_image_folder, split):
    root = make_image_folder(tmp_path / "data")
    shutil.rmtree(root / split)
    with pytest.raises(UserError, match=rf"has no {split}/ folder"):
        scan_dataset(root)


def test_empty_class_folder_is_named(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data")
    (root / "val" / "empty").mkdir()
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError) as info:
        scan_dataset(root)
    assert "holds no images" in str(info.value)
    assert str(root / "train" / "empty") in str(info.value)


def test_single_class_is_rejected(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", classes=("only",))
    with pytest.raises(UserError, match=r"1 class folder.*at least 2"):
        scan_dataset(root)


def test_train_val_class_sets_differ_lists_classes(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", classes=("cat", "dog", "bird"), per_class={"train": 1})
    make_image_folder(root, classes=("cat", "dog", "fish"), per_class={"val": 1})
    with pytest.raises(UserError) as info:
        scan_dataset(root)
    message = str(info.value)
    assert "train and val class folders differ" in message
    assert "only in train: bird" in message and "only in val: fish" in message
    assert "cat" not in message and "dog" not in message


def test_test_split_with_other_classes_is_rejected(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class={"train": 1, "val": 1})
    make_image_folder(root, classes=("a", "b"), per_class={"test": 1})
    with pytest.raises(UserError, match=r"train and test class folders differ: only in train: c"):
        scan_dataset(root)


def test_hidden_and_non_image_files_are_ignored_and_counted(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data")
    (root / "train" / "a" / "notes.txt").write_text("x")
    (root / "train" / "b" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "val" / "c" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    shutil.copy(root / "train" / "a" / "img_000.png", root / "train" / "a" / ".hidden.png")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    classes, splits = scan_dataset(root)
    assert classes == ["a", "b", "c"]
    assert len(splits["train"].samples) == 18 and len(splits["val"].samples) == 9
    assert splits["train"].ignored == 3 and splits["val"].ignored == 1
    assert all(path.suffix == ".png" and not path.name.startswith(".") for path, _ in splits["train"].samples)

    data = load_image_data(root, 8, num_workers=0)
    assert data.ignored_files == 4
    assert data.counts == {"train": 18, "val": 9}


def test_labels_follow_sorted_class_names(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", classes=("zebra", "ant", "mole"), per_class={"train": 2, "val": 1})
    classes, splits = scan_dataset(root)
    assert classes == ["ant", "mole", "zebra"]
    for path, label in splits["train"].samples:
        assert path.parent.name == classes[label]


# --- decoding ----------------------------------------------------------------------------------------

def _save(path: Path, image: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _mode_images(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), mode="RGB")
    gray16 = Image.fromarray((np.arange(120).reshape(12, 10) * 500).astype(np.uint16))
    assert gray16.mode == "I;16"
    return {
        "L": _save(tmp_path / "l.png", rgb.convert("L")),
        "RGBA": _save(tmp_path / "rgba.png", rgb.convert("RGBA")),
        "P": _save(tmp_path / "p.png", rgb.convert("P")),
        "LA": _save(tmp_path / "la.png", rgb.convert("LA")),
        "I;16": _save(tmp_path / "i16.png", gray16),
        "CMYK": _save(tmp_path / "cmyk.jpg", rgb.convert("CMYK")),
        "1": _save(tmp_path / "bw.bmp", rgb.convert("1")),
    }


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "I;16", "CMYK", "1"])
def test_every_mode_decodes_to_uint8_rgb(tmp_path, mode):
    path = _mode_images(tmp_path)[mode]
    with Image.open(path) as img:
        assert img.mode == mode  # the file really is in that mode
    assert load_rgb(path).mode == "RGB"
    tensor = decode(path, 8)
    assert tensor.dtype == torch.uint8
    assert tuple(tensor.shape) == (3, 8, 8)


def test_grayscale_gives_equal_channels(tmp_path):
    tensor = decode(_mode_images(tmp_path)["L"], 8)
    assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_sixteen_bit_uses_the_full_range(tmp_path):
    path = _save(tmp_path / "bright16.png", Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)))
    assert decode(path, 8).min().item() == 255
    path = _save(tmp_path / "mid16.png", Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)))
    assert 120 <= decode(path, 8).float().mean().item() <= 135
    # a 16-bit image with a spread of values is not saturated to white
    assert decode(_mode_images(tmp_path)["I;16"], 8).float().std().item() > 10


def test_decode_resizes_shorter_side_and_center_crops(tmp_path):
    wide = np.zeros((8, 24, 3), dtype=np.uint8)
    wide[:, 8:16] = 255  # only the middle third is white: the center crop keeps exactly that
    tensor = decode(_save(tmp_path / "wide.png", Image.fromarray(wide)), 8)
    assert tuple(tensor.shape) == (3, 8, 8)
    assert tensor.min().item() >= 250


@pytest.mark.parametrize("content", [b"this is not an image", "truncated"])
def test_corrupt_image_names_its_path_and_can_be_skipped(tmp_path, make_image_folder, content):
    root = make_image_folder(tmp_path / "data")
    bad = root / "train" / "b" / "broken.png"
    if content == "truncated":
        full = (root / "train" / "b" / "img_000.png").read_bytes()
        bad.write_bytes(full[: len(full) // 2])
    else:
        bad.write_bytes(content)
    with pytest.raises(UserError) as info:
        load_image_data(root, 8, num_workers=0)
    assert str(bad) in str(info.value) and "--skip-bad-images" in str(info.value)
    assert "\n" not in str(info.value)

    data = load_image_data(root, 8, num_workers=0, skip_bad_images=True)
    assert data.bad_images == 1
    assert data.counts == {"train": 18, "val": 9}
    assert len(data.splits["train"].images) == len(data.splits["train"].labels) == 18


# --- image size "auto" -------------------------------------------------------------------------------

def test_auto_size_uses_typical_shorter_side(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class={"train": 2, "val": 1}, size=40)
    assert load_image_data(root, "auto", num_workers=0).image_size == 40


def test_auto_size_clamps_small_images(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data", per_class={"train": 2, "val": 1}, size=8)
    data = load_image_data(root, "auto", num_workers=0)
    assert data.image_size == AUTO_SIZE_RANGE[0]
    assert tuple(data.splits["train"].images.shape[1:]) == (3, AUTO_SIZE_RANGE[0], AUTO_SIZE_RANGE[0])


def test_auto_size_shorter_side_and_upper_clamp(tmp_path):
    samples = []
    for i, (w, h) in enumerate([(60, 40), (40, 50), (90, 40)]):
        samples.append((_save(tmp_path / f"r{i}.png", Image.new("RGB", (w, h))), 0))
    assert auto_image_size(samples) == 40
    big = [(_save(tmp_path / "big.png", Image.new("RGB", (300, 320))), 0)]
    assert auto_image_size(big) == AUTO_SIZE_RANGE[1]


# --- batches and augmentation --------------------------------------------------------------------------

def _epoch(data, seed, epoch, batch_size=8):
    batches = list(data.train_batches(seed, epoch, batch_size, CPU, channels_last=False))
    return torch.cat([x for x, _, _, _ in batches]), torch.cat([y for _, y, _, _ in batches])


def test_train_batches_repeat_per_seed_and_epoch(image_folder):
    data = load_image_data(image_folder, 8, hflip=True, num_workers=0)
    images, labels = _epoch(data, seed=0, epoch=0)
    again_images, again_labels = _epoch(data, seed=0, epoch=0)
    assert torch.equal(labels, again_labels) and torch.equal(images, again_images)

    next_images, next_labels = _epoch(data, seed=0, epoch=1)
    assert not (torch.equal(labels, next_labels) and torch.equal(images, next_images))
    other_seed_images, _ = _epoch(data, seed=1, epoch=0)
    assert not torch.equal(images, other_seed_images)

    assert images.dtype == torch.float32 and tuple(images.shape) == (18, 3, 8, 8)
    assert sorted(labels.tolist()) == sorted(data.splits["train"].labels.tolist())


def test_train_batches_name_each_image_by_its_position_in_the_train_split(image_folder):
    for cache_max_gb in (4.0, 0):  # decoded in memory, and streamed
        data = load_image_data(image_folder, 8, hflip=False, num_workers=0, cache_max_gb=cache_max_gb)
        train = data.splits["train"]
        seen = []
        for _, labels, indices, _ in data.train_batches(0, 0, 4, CPU, channels_last=False):
            assert torch.equal(labels, train.labels[indices])
            seen += indices.tolist()
        assert sorted(seen) == list(range(len(train)))


def test_train_batches_drop_a_lone_last_image(image_folder):
    data = load_image_data(image_folder, 8, num_workers=0)  # 18 training images
    _, labels = _epoch(data, seed=0, epoch=0, batch_size=17)
    assert len(labels) == 17


def test_streamed_and_cached_batches_match(image_folder):
    cached = load_image_data(image_folder, 8, num_workers=0)
    streamed = load_image_data(image_folder, 8, num_workers=0, cache_max_gb=0)
    assert cached.splits["train"].images is not None and streamed.splits["train"].images is None
    assert cached.mean == pytest.approx(streamed.mean) and cached.std == pytest.approx(streamed.std)
    a, la = _epoch(cached, seed=3, epoch=2)
    b, lb = _epoch(streamed, seed=3, epoch=2)
    assert torch.equal(la, lb) and torch.allclose(a, b)


@pytest.mark.parametrize("hflip", [True, False])
def test_augment_keeps_shape_and_dtype(image_folder, hflip):
    data = load_image_data(image_folder, 8, hflip=hflip, num_workers=0)
    images = data.splits["train"].images[:5]
    out = data.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    again = data.augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_augment_is_a_padded_crop(image_folder):
    data = load_image_data(image_folder, 8, hflip=False, num_workers=0)
    images = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    out = data.augment(images, torch.Generator().manual_seed(0))
    # pad = 1 pixel: every crop keeps at least a 7x7 block of the image, and some crops show padding
    assert all((crop == 200).sum().item() >= 3 * 7 * 7 for crop in out)
    assert (out == 0).any()


def test_normalized_batches_use_train_statistics(image_folder):
    data = load_image_data(image_folder, 8, num_workers=0)
    images = torch.cat([x for x, _ in data.eval_batches("train", 64, CPU, channels_last=False)])
    assert images.mean(dim=(0, 2, 3)).abs().max().item() < 1e-4
    assert (images.std(dim=(0, 2, 3)) - 1).abs().max().item() < 0.05


# --- digits demo -----------------------------------------------------------------------------------

def test_export_digits_demo_once(tmp_path):
    root = tmp_path / "digits"
    assert export_digits_demo(root) == root
    counts = {}
    for split in ("train", "val", "test"):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == [str(d) for d in range(10)]
        counts[split] = len(list((root / split).rglob("*.png")))
    assert sum(counts.values()) == 1797
    assert counts["train"] == 1078 and abs(counts["val"] - counts["test"]) <= 1
    assert not (tmp_path / "digits.partial").exists()
    with Image.open(next((root / "train" / "3").glob("*.png"))) as img:
        assert img.size == (8, 8) and img.mode == "L"

    files = sorted(root.rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    export_digits_demo(root)
    assert sorted(root.rglob("*.png")) == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes


def test_export_digits_demo_refuses_a_partial_folder(tmp_path):
    root = tmp_path / "digits"
    (root / "train").mkdir(parents=True)  # no val/: not a complete export
    with pytest.raises(UserError, match="not a complete export"):
        export_digits_demo(root)
    assert not (tmp_path / "digits.partial").exists()


def test_streaming_path_honours_skip_bad_images(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data")
    (root / "train" / "a" / "broken.png").write_bytes(b"garbage")
    data = load_image_data(root, 8, num_workers=0, cache_max_gb=0, skip_bad_images=True)
    assert data.counts["train"] == 18


def test_hidden_subfolders_inside_a_class_are_ignored(tmp_path, make_image_folder):
    root = make_image_folder(tmp_path / "data")
    hidden = root / "train" / "a" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(root / "train" / "a" / "img_000.png", hidden / "img_000-checkpoint.png")
    _, splits = scan_dataset(root)
    assert len(splits["train"].samples) == 18


# --- real-size data: statistics, schedule and loader, the data path's values -------------------------

def _tensor_data(images: torch.Tensor, labels: torch.Tensor, hflip: bool = False) -> ImageData:
    """An in-memory ImageData straight from tensors (no files): train and val are the same images."""
    split = Split(files=None, labels=labels, images=images)
    return ImageData(Path("mem"), ["a", "b"], images.shape[-1], {"train": split, "val": split},
                     [0.5] * 3, [0.25] * 3, hflip, 0, 0, "mem")


@pytest.mark.parametrize("streamed", [False, True])
def test_channel_stats_describe_the_whole_class_ordered_split(streamed):
    # listed class by class, as scan_dataset lists them: 2,500 black images of class 0, then 2,500 white
    images = torch.cat([torch.zeros(2500, 3, 2, 2, dtype=torch.uint8), torch.full((2500, 3, 2, 2), 255, dtype=torch.uint8)])
    labels = torch.cat([torch.zeros(2500, dtype=torch.long), torch.ones(2500, dtype=torch.long)])
    split = (Split(files=list(zip(images, labels.tolist())), labels=labels) if streamed
             else Split(files=None, labels=labels, images=images))
    mean, std = channel_stats(split)
    # half the pixels are 0, half are 1: mean 0.5, std 0.5 (not the first class's 0 and the 1e-3 clamp)
    assert mean == pytest.approx([0.5] * 3, abs=1e-3)
    assert std == pytest.approx([0.5] * 3, abs=1e-3)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_schedule_and_loader_agree_on_every_size(monkeypatch, world):
    for rank in range(world):
        monkeypatch.setattr(distributed, "world_size", lambda: world)
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        for n in range(2 * world, 41):
            data = _tensor_data(torch.zeros(n, 3, 4, 4, dtype=torch.uint8), torch.arange(n) % 2)
            for batch_size in (1, 2, 3, 4, 8, 32):
                sizes = [len(labels) for _, labels, _, _ in data.train_batches(0, 0, batch_size, CPU, False)]
                assert len(sizes) == data.steps_per_epoch(batch_size), (n, batch_size, world, rank)
                assert sum(sizes) == data.epoch_images(batch_size)
                assert batch_size == 1 or 1 not in sizes  # never a batch of one for BatchNorm


def test_data_path_values_are_unchanged(tmp_path, make_image_folder):
    """The order, crops, flips and normalisation of CPU batches, pinned as digests before the data path
    learnt non-blocking copies: on the CPU the records stay what they were."""
    root = make_image_folder(tmp_path / "data", per_class={"train": 7, "val": 2}, size=8)
    expected = {False: ['2fa66b524dee819b', '648fb21579122e6e', '6aa960f06c234145', 'dda33091799f1ee2',
                        '7eb3b7adbed1b4e0'],
                True: ['37e144bf217749f0', 'b6f1e452e0ec84f6', '60b493793604baf4', '06d3727814194d23',
                       'd562cbbe16614066']}
    for hflip, digests in expected.items():
        data = load_image_data(root, 8, hflip=hflip, num_workers=0)
        data.mean, data.std = [0.25, 0.5, 0.75], [0.5, 0.25, 0.125]
        assert [tensor_digest(*b[:2]) for b in data.train_batches(3, 1, 4, CPU, True)] == digests
        assert [tensor_digest(*b) for b in data.eval_batches("val", 4, CPU, True)] == ['a54b649ae6191f93',
                                                                                        '9b2cf75b03c57267']


def test_readme_and_final_py_give_the_auto_size_range_the_code_clamps_to():
    low, high = AUTO_SIZE_RANGE
    repo = Path(__file__).resolve().parents[1]
    assert f"clamped to {low}–{high} px" in (repo / "README.md").read_text(encoding="utf-8")
    assert f"typical shorter side of the images, {low}..{high})" in (repo / "final.py").read_text(encoding="utf-8")
