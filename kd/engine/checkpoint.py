"""Atomic writes and safe checkpoint loading.

Every file the project writes goes to a temporary file in the same folder and is then renamed over
the target, so a crash or `kill -9` leaves either the old file or the new one, never half of one.
Checkpoints hold only tensors and primitives: `{"model": state_dict, "meta": {...}}`, loadable with
`torch.load(path, weights_only=True)`.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kd.engine import distributed
from kd.errors import UserError
from models.errors import error_reason


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call `write(file)` on a temporary file next to `path`, fsync it, then rename it into place.

    In a torchrun job only rank 0 writes; the other processes hold the same state.
    """
    if not distributed.is_main():
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise UserError(f"cannot write to '{path.parent}' ({err.strerror}): choose a writable folder "
                        "(--logs-dir / --checkpoints-dir) or free some space") from None
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write '{path}' ({err.strerror}): free some space or choose another "
                        "folder; files written earlier are intact") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


class _WriteErrors:
    """A file for torch.save that keeps the OSError of a failed write (a full disk): torch's writer
    replaces it with a RuntimeError that no longer says what happened."""

    def __init__(self, handle: Any):
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_state(path: str | Path, state: dict) -> None:
    """torch.save of tensors and primitives, atomically; streamed into the file, so that no serialised
    copy of the state is held in memory (a model with its optimizer state would be held twice)."""
    def write(handle: Any) -> None:
        file = _WriteErrors(handle)
        try:
            torch.save(state, file)
        except RuntimeError:
            if file.error is None:
                raise
            raise file.error from None  # atomic_write turns it into one line naming the file
    atomic_write(path, write)


def load_state(path: str | Path, fix: str = "delete it or pass --retrain-teacher to train a new one") -> dict:
    """torch.load with `weights_only=True`; a damaged or foreign file is a UserError naming it and `fix`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for foreign or damaged files; all mean the same here
        raise UserError(f"'{path}' is not a readable checkpoint ({error_reason(err)}): {fix}") from None


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict) -> None:
    """Save a model's weights (moved to CPU, contiguous) with its metadata, atomically."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_state(path, {"model": state, "meta": meta})


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint with `weights_only=True`; a damaged or foreign file is a UserError naming it."""
    checkpoint = load_state(path)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "meta" not in checkpoint:
        raise UserError(f"'{path}' is not a checkpoint of this project (no model/meta): delete it or pass "
                        "--retrain-teacher")
    return checkpoint
