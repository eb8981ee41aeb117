"""CRD: Tian, Krishnan & Isola, "Contrastive Representation Distillation" (ICLR 2020).

The student's pooled feature, embedded and L2-normalised, must pick out the teacher's embedding of the same
image among nce_k teacher embeddings of images from other classes, and vice versa (a noise-contrastive
estimate of their mutual information). The other images' embeddings come from two memory banks, one row per
training image, updated with momentum as the images pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd.engine import distributed
from kd.methods.base import Distiller
from kd.methods.common import kd_loss
from kd.methods.registry import Method, register
from kd.rules import BELOW_ONE, NON_NEGATIVE, POSITIVE, POSITIVE_INT
from kd.space import Range
from models import classifier_name

EPS = 1e-7


def contrast_loss(x: torch.Tensor, n_data: int) -> torch.Tensor:
    """The NCE loss of scores x (N, K+1) (or (N, K+1, 1)): column 0 the positive pair, then K negatives, each
    against noise at m * Pn = K / n_data:
    -(1/N) [sum_i log(x_i0 / (x_i0 + m Pn + eps)) + sum_ij log(m Pn / (x_ij + m Pn + eps))]."""
    x = x.float().reshape(x.shape[0], -1)
    noise = (x.shape[1] - 1) / n_data
    positive = torch.log(x[:, 0] / (x[:, 0] + noise + EPS))
    negative = torch.log(noise / (x[:, 1:] + noise + EPS))
    return -(positive.sum() + negative.sum()) / x.shape[0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)  # no eps, as the reference's Normalize


class NegativeSampler:
    """Draws, for each anchor, k training images of other classes: uniformly without replacement (with
    replacement only when fewer than k such images exist), as RepDistiller's CIFAR100InstanceSample does."""

    def __init__(self, train_labels: torch.Tensor):
        self.labels = train_labels
        self.by_class = train_labels.argsort(stable=True)  # positions grouped class by class
        counts = torch.bincount(train_labels)
        self.counts, self.starts = counts, counts.cumsum(0) - counts

    def draw(self, anchors: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(N, k) training positions for the anchors' positions (N,), none of the anchor's class."""
        rows = []
        for label in self.labels[anchors].tolist():
            pool = len(self.by_class) - int(self.counts[label])
            slots = (torch.randperm(pool, generator=generator)[:k] if k <= pool
                     else torch.randint(pool, (k,), generator=generator))
            # skip over the anchor's class: slots from its start on lie count positions further
            slots = slots + self.counts[label] * (slots >= self.starts[label])
            rows.append(self.by_class[slots])
        return torch.stack(rows)


class CRD(Distiller):
    """CRD on the pooled features (what each classifier sees): works with any teacher, ViTs included. The
    embeddings train with the student (the teacher's too); the memory banks are buffers, so the resume state
    carries them. Neither is ever saved with the student."""
    needs_teacher = True
    needs_index = True

    def __init__(self, student: nn.Module, teacher: nn.Module, *, ce_weight: float, kd_weight: float,
                 temperature: float, beta: float, feat_dim: int, nce_k: int, nce_t: float, nce_m: float):
        super().__init__(student, teacher)
        self.ce_weight, self.kd_weight, self.temperature, self.beta = ce_weight, kd_weight, temperature, beta
        self.feat_dim, self.nce_k, self.nce_t, self.nce_m = feat_dim, nce_k, nce_t, nce_m
        self.student_pooled, self.teacher_pooled = self.tap_pooled(student), self.tap_pooled(teacher)
        widths = [model.get_submodule(classifier_name(model)).in_features for model in (student, teacher)]
        self.embed_s, self.embed_t = nn.Linear(widths[0], feat_dim), nn.Linear(widths[1], feat_dim)
        self.sampler: NegativeSampler | None = None

    def attach_data(self, train_labels: torch.Tensor, seed: int) -> None:
        """Memory banks for the training set, initialised uniform in [-a, a], a = 1/sqrt(feat_dim/3), from the
        run's seed; the constants Z are fixed on the first step (-1: not yet)."""
        self.seed, self.n_data = seed, len(train_labels)
        self.sampler = NegativeSampler(train_labels)
        generator = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(self.feat_dim / 3)
        for name in ("memory_s", "memory_t"):
            self.register_buffer(name, (torch.rand(self.n_data, self.feat_dim, generator=generator) * 2 - 1) * bound)
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self.register_buffer("steps", torch.tensor(0))  # seeds each step's negatives, so a resumed run draws alike

    def contrast_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(N, K+1): each anchor's own position, then nce_k negatives drawn for this step."""
        step = int(self.steps)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 1_009 + distributed.rank())
        anchors = indices.cpu()
        negatives = self.sampler.draw(anchors, self.nce_k, generator)
        self.steps += 1
        return torch.cat([anchors[:, None], negatives], dim=1).to(indices.device)

    def _scores(self, memory: torch.Tensor, contrast: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        """exp(memory[contrast] . anchor / nce_t), (N, K+1), the memory rows a fixed target."""
        rows = memory[contrast].detach()  # (N, K+1, feat_dim)
        return torch.exp(torch.bmm(rows, anchor[:, :, None]).squeeze(2) / self.nce_t)

    @torch.no_grad()
    def _update_memory(self, v_s: torch.Tensor, v_t: torch.Tensor, indices: torch.Tensor) -> None:
        """Momentum update of the anchors' rows, the same on every process (all of them see every batch)."""
        v_s, v_t, indices = (distributed.gather_all(x) for x in (v_s.detach(), v_t.detach(), indices))
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            memory[indices] = _unit(self.nce_m * memory[indices] + (1 - self.nce_m) * v)

    def forward_train(self, images: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.student(images)
        teacher_logits = self.teacher_forward(images)
        with torch.autocast(images.device.type, enabled=False):  # exp(1/0.07) ~ 1.6e6 would overflow fp16
            v_s = _unit(self.embed_s(self.student_pooled().float()))
            v_t = _unit(self.embed_t(self.teacher_pooled().float()))
            contrast = self.contrast_indices(indices)
            out_s = self._scores(self.memory_t, contrast, v_s)  # the student's anchor among teacher rows
            out_t = self._scores(self.memory_s, contrast, v_t)
            if self.z_s < 0:  # fixed once, from the first batch (averaged over the processes)
                for z, out in ((self.z_s, out_s), (self.z_t, out_t)):
                    z.fill_(float(distributed.sum_all(out.mean().detach())) / distributed.world_size() * self.n_data)
            crd = contrast_loss(out_s / self.z_s, self.n_data) + contrast_loss(out_t / self.z_t, self.n_data)
            self._update_memory(v_s, v_t, indices)
        losses = {"loss_ce": self.ce_weight * F.cross_entropy(logits, targets), "loss_crd": self.beta * crd}
        if self.kd_weight > 0:  # "CRD+KD" (RepDistiller's -a 1); plain CRD has no KD term
            losses["loss_kd"] = self.kd_weight * kd_loss(logits, teacher_logits, self.temperature)
        return logits, losses


register(Method(
    "CRD", CRD,
    {"ce_weight": NON_NEGATIVE, "kd_weight": NON_NEGATIVE, "temperature": POSITIVE, "beta": NON_NEGATIVE,
     "feat_dim": POSITIVE_INT, "nce_k": POSITIVE_INT, "nce_t": POSITIVE, "nce_m": BELOW_ONE},
    idea="Tian et al. (ICLR 2020): contrastive: the student's pooled feature is pulled towards the teacher's for "
         "the same image and away from the teacher's for images of other classes.",
    search_space={"beta": Range(0.1, 4.0, log=True), "nce_t": Range(0.02, 0.5, log=True)}))
