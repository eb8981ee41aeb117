"""Metrics of a trained model's val predictions, and statistics across seeds.

Everything works on class probabilities (N, K) and integer labels (N,), so a record can be rebuilt
from stored numbers. Calibration (ECE) has no scikit-learn function; the rest uses scikit-learn/scipy.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.utils.flop_counter
from scipy import stats
from sklearn.metrics import confusion_matrix, log_loss

from kd.engine.runtime import Runtime
from kd.results.record import ModelCost, PredictionMetrics

ECE_BINS = 15


def top_k_accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of images whose label is among the k most probable classes (k capped at K)."""
    k = min(k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class."""
    return float(log_loss(labels, probs, labels=list(range(probs.shape[1]))))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Per equal-width confidence bin: image count, mean confidence and accuracy (None when empty)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # bin b holds confidences in (b/n, (b+1)/n]; a confidence of exactly 0 joins the first bin
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins = {"count": [], "confidence": [], "accuracy": []}
    for b in range(n_bins):
        members = index == b
        bins["count"].append(int(members.sum()))
        bins["confidence"].append(float(confidence[members].mean()) if members.any() else None)
        bins["accuracy"].append(float(correct[members].mean()) if members.any() else None)
    return bins


def expected_calibration_error(bins: dict) -> float:
    """ECE = Σ_b (n_b / N) · |accuracy_b − confidence_b| over the non-empty bins."""
    total = sum(bins["count"])
    return float(sum(n / total * abs(acc - conf)
                     for n, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"]) if n))


def agreement(predictions: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of images where two models' top-1 predictions agree."""
    return float((predictions == reference).mean())


def prediction_metrics(probs: torch.Tensor, labels: torch.Tensor, teacher_predictions: torch.Tensor | None
                       ) -> PredictionMetrics:
    """The record's metrics of one model's val probabilities."""
    p, y = probs.double().numpy(), labels.numpy()
    p = p / p.sum(axis=1, keepdims=True)  # low-precision softmax rows may miss 1 by a rounding error
    predictions = p.argmax(axis=1)
    matrix = confusion_matrix(y, predictions, labels=list(range(p.shape[1])))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    bins = reliability_bins(p, y)
    return PredictionMetrics(
        top5_accuracy=top_k_accuracy(p, y, 5),
        nll=nll(p, y),
        ece=expected_calibration_error(bins),
        teacher_agreement=(agreement(predictions, teacher_predictions.numpy())
                           if teacher_predictions is not None else None),
        per_class_accuracy=per_class.tolist(),
        confusion_matrix=matrix.tolist(),
        reliability=bins,
    )


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value: one run has no spread to show)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else None


def paired_comparison(method: dict[int, float], baseline: dict[int, float]) -> tuple[float | None, float | None]:
    """Mean paired gain over the seeds both ran, and the paired t-test's two-sided p-value (None if < 2)."""
    seeds = sorted(set(method) & set(baseline))
    if not seeds:
        return None, None
    a = np.array([method[s] for s in seeds])
    b = np.array([baseline[s] for s in seeds])
    gain = float((a - b).mean())
    differences = a - b
    # one seed, or the same difference in every seed (up to float rounding of fractions): no t statistic
    if len(seeds) < 2 or np.allclose(differences, differences[0], rtol=0, atol=1e-12):
        return gain, None
    return gain, float(stats.ttest_rel(a, b).pvalue)


@torch.no_grad()
def forward_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    """FLOPs of `model`'s forward pass on `image` (counted per operator by PyTorch)."""
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        model(image)
    return int(counter.get_total_flops())


@torch.no_grad()
def model_cost(model: torch.nn.Module, image_size: int, runtime: Runtime, runs: int = 20) -> ModelCost:
    """Parameters, FLOPs of one image's forward pass, and median batch-1 inference latency (ms) on the
    runtime's device and precision."""
    was_training = model.training
    model.eval()
    image = torch.randn(1, 3, image_size, image_size, device=runtime.device)
    if next(model.parameters()).is_contiguous(memory_format=torch.channels_last):
        image = image.contiguous(memory_format=torch.channels_last)
    flops = forward_flops(model, image)
    timings = []
    with runtime.autocast():
        for i in range(runs + 3):  # the first runs warm up caches and kernels
            runtime.synchronize()
            started = time.perf_counter()
            model(image)
            runtime.synchronize()
            if i >= 3:
                timings.append((time.perf_counter() - started) * 1000.0)
    model.train(was_training)
    return ModelCost(params=sum(p.numel() for p in model.parameters()), flops=flops,
                     latency_ms=float(np.median(timings)))
