"""Score every pool image with the teacher: hard pseudo-label, energy and entropy.

Energy E(x) = -T * logsumexp(logits / T): low energy means the teacher finds the image
target-like (Liu et al., 2020), which is what the paper prunes by. Scoring the pool is the sender's
longest step, so logits are written in chunks (atomically, one file per chunk) under a cache keyed
by teacher weights, pool fingerprint and chunk size; a killed run recomputes only the chunks that
are missing or unreadable, and the merged result is identical to an uninterrupted run. Logits are
kept, so energy at another temperature costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .backbones import Classifier
from .data import atomic_save_npy
from .errors import PladaError
from .images import LazyImages
from .pool import Pool
from .train import predict

CHUNK = 8192


def chunk_size() -> int:
    """Images per scoring chunk: `PLADA_SCORE_CHUNK`, else CHUNK. Smaller chunks lose less to a crash."""
    raw = os.environ.get("PLADA_SCORE_CHUNK", "")
    if not raw:
        return CHUNK
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise PladaError(f"PLADA_SCORE_CHUNK must be a positive integer, got {raw!r}")
    return value


def energy(logits: np.ndarray, T: float = 1.0) -> np.ndarray:
    """-T·logsumexp(logits/T), float64, numerically stable."""
    z = logits.astype(np.float64) / T
    m = z.max(1, keepdims=True)
    return -T * (m[:, 0] + np.log(np.exp(z - m).sum(1)))


def entropy(logits: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of softmax(logits)."""
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return -(p * np.log(np.clip(p, 1e-300, None))).sum(1)


@dataclass
class Scores:
    """Per pool image: logits and the quantities selection uses."""

    logits: np.ndarray  # (N, C) float32

    @property
    def labels(self) -> np.ndarray:
        return self.logits.argmax(1).astype(np.int64)

    def energy(self, T: float = 1.0) -> np.ndarray:
        return energy(self.logits, T)

    def entropy(self) -> np.ndarray:
        return entropy(self.logits)


def model_digest(model: Classifier) -> str:
    """Hash of the weights: the scoring cache must never serve another teacher's logits."""
    h = hashlib.sha256(f"{model.name}:{model.res}".encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_chunk(path: Path, rows: int, classes: int) -> np.ndarray | None:
    """A finished chunk, or None when absent or not what this run would have written (then recompute)."""
    try:
        arr = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    return arr if arr.dtype == np.float32 and arr.shape == (rows, classes) else None


def score_dir(cache: str | os.PathLike, pool: Pool, model: Classifier, chunk: int) -> Path:
    """Where the chunks of one (pool, teacher, chunk size) live, whichever engine computed them.

    Engines share it on purpose: chunks scored on a cluster (`--engine ray`) are reused by a later
    local `send`, as chunks from another thread count would be.
    """
    suffix = "" if chunk == CHUNK else f"-c{chunk}"  # default size keeps the older caches' folder name
    return Path(cache) / f"{pool.fingerprint[:16]}-{model_digest(model)[:16]}{suffix}"


def score_pool(
    model: Classifier, pool: Pool, cache: Path, batch_size: int = 256, progress: bool = True,
    chunk: int | None = None, device: torch.device | str | None = None,
) -> Scores:
    """Teacher logits for the whole pool, resumable chunk by chunk from `cache`.

    ``device`` (None: the CPU) is not part of the cache: chunks scored on a GPU resume a CPU run and the
    other way round, as chunks from another thread count would (labels and ranks agree in practice)."""
    chunk = chunk or chunk_size()
    d = score_dir(cache, pool, model, chunk)
    d.mkdir(parents=True, exist_ok=True)
    n, classes = len(pool), model.head.out_features
    view = pool.images_at(model.res)  # a folder or shard pool: its files decoded at the model's own size
    lazy = view if isinstance(view, LazyImages) else None
    parts = []
    with tqdm(total=n, desc="scoring pool", unit="img", disable=not progress) as bar:
        for a in range(0, n, chunk):
            path = d / f"{a:012d}.npy"
            logits = load_chunk(path, min(chunk, n - a), classes)
            if logits is None:
                if lazy is None:
                    logits = predict(model, pool.images[a : a + chunk], batch_size=batch_size, progress=False,
                                     device=device)
                else:
                    with closing(lazy.stream(a, a + chunk, batch_size)) as rows:  # decoding overlaps the forward
                        logits = predict(model, rows, batch_size=batch_size, progress=False, device=device)
                logits = logits.astype(np.float32)
                atomic_save_npy(path, logits)
            parts.append(logits)
            bar.update(len(logits))
    if lazy is not None:
        lazy.warn_bad()  # the files that read as zeros, named once for the whole pool
    return Scores(np.concatenate(parts) if parts else np.zeros((0, classes), np.float32))
