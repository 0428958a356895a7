"""Frozen backbone features, computed once per (model, images) and cached on disk.

Linear-head students and proxy students only ever see frozen features, so a pool's features are
the one expensive step of a whole grid of selections: caching them turns hundreds of student runs
into seconds each. An entry is keyed by the model's weights and the images' content, so a changed
dataset or backbone is never served stale features, and a damaged entry is recomputed.
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
from contextlib import closing
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import backbones
from .data import atomic_save_npy, atomic_save_rows, cache_root
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


FEATURE_CHUNK = 8192  # rows per part file of a feature build (rounded up to whole batches)


def cached_features(
    model: backbones.Classifier, images: np.ndarray, key: str, progress: bool = True, batch_size: int = 256,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Features of `images` under `model`; `key` must identify the images' content (e.g. pool fingerprint).

    ``device`` (None: the CPU) is where missing features are computed, and no part of the key, as the thread
    count is not: an entry names a backbone and images, and a GPU's features differ from the CPU's only by
    mixed-precision rounding, so a pool embedded once on a GPU serves later CPU runs too.

    A missing entry is built part by part (`FEATURE_CHUNK` rows, each saved atomically in `<tag>.parts/`),
    then merged into `<tag>.npy` a part at a time: a million-image pool's features are never whole in
    memory, and a killed build resumes from its last finished part. Parts are whole batches, so every
    batch is the one a single `predict` over all rows would run, and the features are the same floats."""
    tag = hashlib.sha256(f"{embed_digest(model)}:{key}:{len(images)}".encode()).hexdigest()[:20]
    root = cache_root() / "features"
    path = root / f"{tag}.npy"
    try:
        feats = np.load(path, mmap_mode="r")
        if feats.dtype == np.float32 and feats.ndim == 2 and len(feats) == len(images):
            return feats
    except (OSError, ValueError, EOFError):  # absent, or torn: computed again
        pass
    parts = root / f"{tag}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    n, dims = len(images), set()
    step = -(-FEATURE_CHUNK // batch_size) * batch_size
    lazy = images.at(model.res) if isinstance(images, LazyImages) else None  # decoded at the model's size

    def part(a: int, b: int) -> np.ndarray:
        pfile = parts / f"{a:012d}-b{batch_size}.npy"  # another batch size batches otherwise: not reused
        try:
            block = np.load(pfile)
            if block.dtype == np.float32 and block.ndim == 2 and len(block) == b - a and dims <= {block.shape[1]}:
                dims.add(block.shape[1])
                bar.update(b - a)
                return block
        except (OSError, ValueError, EOFError):  # absent, or torn: computed again
            pass
        if lazy is None:
            block = predict(model, images[a:b], batch_size=batch_size, progress=False, features=True, device=device)
        else:
            with closing(lazy.stream(a, b, batch_size)) as rows:  # decoding overlaps the forward
                block = predict(model, rows, batch_size=batch_size, progress=False, features=True, device=device)
        block = block.astype(np.float32)
        dims.add(block.shape[1])
        try:
            parts.mkdir(parents=True, exist_ok=True)
            atomic_save_npy(pfile, block)
        except OSError:  # a part only saves work on a resume; a concurrent build of this entry may remove them
            pass
        bar.update(b - a)
        return block

    with tqdm(total=n, desc=f"features {key[:24]}", unit="img", disable=not progress) as bar:
        first = part(0, min(step, n)) if n else np.zeros((0, model.dim), np.float32)  # its width is the entry's
        rest = (part(a, min(a + step, n)) for a in range(step, n, step))
        atomic_save_rows(path, (n, first.shape[1]), np.float32, itertools.chain([first], rest))
    if lazy is not None:
        images.warn_bad()
    shutil.rmtree(parts, ignore_errors=True)
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
