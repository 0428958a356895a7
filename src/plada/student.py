"""The receiver's student: trained only on pool images and the labels the payload carries.

Three modes for three kinds of receiver: `finetune` (pretrained backbone, AdamW lr 1e-3, cosine:
the paper's recipe), `linear` (frozen pretrained features, trained head: fast enough for large
benchmark grids), and `scratch` (no pretrained weights at all, e.g. `small-cnn`).
"""

from __future__ import annotations

import numpy as np
import torch

from . import backbones
from .config import STUDENT_MODES, StudentConfig
from .errors import PladaError
from .train import fit, fit_linear

MODES = STUDENT_MODES


def train_student(
    images: np.ndarray, labels: np.ndarray, n_classes: int, cfg: StudentConfig, progress: bool = True,
    feats: np.ndarray | None = None, device: torch.device | str | None = None,
) -> backbones.Classifier:
    """A student trained on (pool images, payload labels); `feats` lets linear mode reuse cached features.

    ``device`` is where it trains (None: the CPU); the student comes back on the CPU either way."""
    cfg = cfg.for_receiver("plain").for_rows(len(labels))  # no mode asked for, no payload: the fine-tuned student
    if cfg.mode not in MODES:
        raise PladaError(f"unknown student mode '{cfg.mode}' (have: {', '.join(MODES)})")
    if len(labels) == 0:
        raise PladaError("the payload keeps no images: nothing to train a student on")
    torch.manual_seed(cfg.seed)  # the fresh head's init must be seeded too
    model = backbones.create(cfg.model, n_classes, cfg.res, pretrained=cfg.mode != "scratch", weights=cfg.weights)
    if cfg.mode == "linear":
        fit_linear(model, images, labels, seed=cfg.seed, progress=progress, feats=feats, device=device)
    else:
        fit(model, images, labels, cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, flip=cfg.flip,
            desc="student", progress=progress, device=device)
    return model
