"""Score every pool image with the teacher: hard pseudo-label, energy and entropy.

Energy E(x) = -T * logsumexp(logits / T): low energy means the teacher finds the image
target-like (Liu et al., 2020), which is what the paper prunes by. Scoring the pool is the sender's
longest step, so logits are written in chunks (atomically, one file per chunk) under a cache keyed
by teacher weights and pool fingerprint; a killed run resumes at the first missing chunk and the
merged result is identical to an uninterrupted run. Logits are kept, so energy at another
temperature costs nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .backbones import Classifier
from .pool import Pool
from .train import predict

CHUNK = 8192


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


def score_pool(
    model: Classifier, pool: Pool, cache: Path, batch_size: int = 256, progress: bool = True, chunk: int = CHUNK
) -> Scores:
    """Teacher logits for the whole pool, resumable chunk by chunk from `cache`."""
    d = Path(cache) / f"{pool.fingerprint[:16]}-{model_digest(model)[:16]}"
    d.mkdir(parents=True, exist_ok=True)
    n = len(pool)
    starts = list(range(0, n, chunk))
    todo = [a for a in starts if not (d / f"{a:012d}.npy").is_file()]
    bar = tqdm(total=n, initial=(len(starts) - len(todo)) * chunk if todo else n, desc="scoring pool", unit="img",
               disable=not progress)
    for a in todo:
        logits = predict(model, pool.images[a : a + chunk], batch_size=batch_size, progress=False)
        tmp = d / f"{a:012d}.npy.tmp"
        with open(tmp, "wb") as f:
            np.save(f, logits.astype(np.float32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, d / f"{a:012d}.npy")
        bar.update(len(logits))
    bar.close()
    return Scores(np.concatenate([np.load(d / f"{a:012d}.npy") for a in starts]))
