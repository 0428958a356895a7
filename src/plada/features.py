"""Frozen backbone features, computed once per (model, images) and cached on disk.

Linear-head students and proxy students only ever see frozen features, so a pool's features are
the one expensive step of a whole grid of selections: caching them turns hundreds of student runs
into seconds each.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from . import backbones
from .data import cache_root
from .train import predict


def feature_model(name: str = "efficientnet-lite0", res: int = 64) -> backbones.Classifier:
    """The pretrained backbone (its head unused) that defines a feature space."""
    return backbones.create(name, 1, res, pretrained=True).eval()


def cached_features(
    model: backbones.Classifier, images: np.ndarray, key: str, progress: bool = True, batch_size: int = 256
) -> np.ndarray:
    """Features of `images` under `model`; `key` must identify the images (e.g. pool fingerprint)."""
    tag = hashlib.sha256(f"{model.name}:{model.res}:{key}:{len(images)}".encode()).hexdigest()[:20]
    path = cache_root() / "features" / f"{tag}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    path.parent.mkdir(parents=True, exist_ok=True)
    feats = predict(model, images, batch_size=batch_size, desc=f"features {key[:24]}", progress=progress,
                    features=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, feats.astype(np.float32))
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def images_key(images: np.ndarray) -> str:
    """A content key for an image array that was not loaded from a named cache."""
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def split_key(root: Path, split: str, n: int) -> str:
    """Key of a dataset split held in the decoded-source cache (whose folder name carries the source hash)."""
    return f"{Path(root).name}/{split}/{n}"


def rows_features(fm: backbones.Classifier, images: np.ndarray, idx: np.ndarray, prefix: str,
                  progress: bool = True) -> np.ndarray:
    """Features of some rows of an image array, cached under a key naming exactly those rows.

    Held-out and reference subsets change with seeds and folds; keying by the rows themselves means a
    changed subset can never be served another subset's features.
    """
    digest = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]
    return np.asarray(cached_features(fm, np.asarray(images[idx]), f"{prefix}/{digest}", progress=progress))
