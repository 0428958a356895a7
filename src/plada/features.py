"""Frozen backbone features, computed once per (model, images) and cached on disk.

Linear-head students and proxy students only ever see frozen features, so a pool's features are
the one expensive step of a whole grid of selections: caching them turns hundreds of student runs
into seconds each. An entry is keyed by the model's weights and the images' content, so a changed
dataset or backbone is never served stale features, and a damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
from contextlib import closing
from pathlib import Path

import numpy as np
import torch

from . import backbones
from .data import atomic_save_npy, cache_root
from .images import LazyImages
from .train import predict


def feature_model(name: str = "efficientnet-lite0", res: int = 64) -> backbones.Classifier:
    """The pretrained backbone (its head unused) that defines a feature space."""
    return backbones.create(name, 1, res, pretrained=True).eval()


def embed_digest(model: backbones.Classifier) -> str:
    """Hash of what defines a feature space: name, resolution and backbone weights (not the unused head).

    Why the weights: two backbones of one name (another weights file, a fine-tuned copy) give other
    features. Why not the head: `feature_model`'s is freshly initialised, unseeded, in every process.
    """
    h = hashlib.sha256(f"{model.name}:{model.res}".encode())
    for k, v in sorted(model.embed.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_features(
    model: backbones.Classifier, images: np.ndarray, key: str, progress: bool = True, batch_size: int = 256,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Features of `images` under `model`; `key` must identify the images' content (e.g. pool fingerprint).

    ``device`` (None: the CPU) is where missing features are computed, and no part of the key, as the thread
    count is not: an entry names a backbone and images, and a GPU's features differ from the CPU's only by
    mixed-precision rounding, so a pool embedded once on a GPU serves later CPU runs too."""
    tag = hashlib.sha256(f"{embed_digest(model)}:{key}:{len(images)}".encode()).hexdigest()[:20]
    path = cache_root() / "features" / f"{tag}.npy"
    try:
        feats = np.load(path, mmap_mode="r")
        if feats.dtype == np.float32 and feats.ndim == 2 and len(feats) == len(images):
            return feats
    except (OSError, ValueError, EOFError):  # absent, or torn: computed again
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(images, LazyImages):  # a folder or shard pool: decoded at the model's size, prefetched
        with closing(images.at(model.res).stream(0, len(images), batch_size)) as rows:
            feats = predict(model, rows, batch_size=batch_size, desc=f"features {key[:24]}", progress=progress,
                            features=True, device=device)
        images.warn_bad()
    else:
        feats = predict(model, images, batch_size=batch_size, desc=f"features {key[:24]}", progress=progress,
                        features=True, device=device)
    atomic_save_npy(path, feats.astype(np.float32))
    return np.load(path, mmap_mode="r")


def split_key(root: Path, split: str, n: int) -> str:
    """Key of a dataset split held in the decoded-source cache (whose folder name carries the source hash)."""
    return f"{Path(root).name}/{split}/{n}"


def rows_features(fm: backbones.Classifier, images: np.ndarray, idx: np.ndarray, prefix: str,
                  progress: bool = True, device: torch.device | str | None = None) -> np.ndarray:
    """Features of some rows of an image array, cached under a key naming exactly those rows and their pixels.

    Held-out and reference subsets change with seeds and folds; keying by the rows themselves means a
    changed subset can never be served another subset's features. The rows' pixels are hashed too: the
    caller's `prefix` (dataset/split/size) stays the same when a dataset's images are edited in place.
    """
    rows = np.asarray(images[idx])
    digest = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]
    content = hashlib.blake2b(np.ascontiguousarray(rows).data, digest_size=16).hexdigest()
    return np.asarray(cached_features(fm, rows, f"{prefix}/{digest}/{content}", progress=progress, device=device))
