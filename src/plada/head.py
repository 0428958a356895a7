"""A head in the pool's PCA space: the target's labelling rule in a few hundred bytes (receiver mode ``head``).

Why it works: sender and receiver hold the same pool and the same public backbone, so both can compute
the same principal components of the pool's features without sending them. A linear head over the first
d whitened components then costs d x classes small integers, where labels for a thousand pool images cost
kilobytes. The receiver applies the head to its whole pool and trains its own student on the pool images
the head is surest of (`plada.receiver`): the payload carries the rule, the receiver's pool the images.

Measured on the shared targets (`python -m benchmarks.pool_head`, results/pool_head.json): CIFAR-10's head
reaches the paper policy's best accuracy in about 1/30 of its bytes. Both sides must agree on the basis:
features L2-normalised, centred on the pool mean, eigenvectors of their float64 covariance by decreasing
eigenvalue, each signed so its largest-magnitude entry is positive, components divided by the square root
of their eigenvalue. Float noise far above a CPU's rounding changes a head's accuracy by under 0.1 point
(benchmarks/reports/POOL_HEAD.md), so another machine's features serve.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import atomic_save_npy, cache_root
from .errors import PladaError
from .payload import HEAD_BITS, Head
from .train import accuracy, torch_threads, train_head

DIMS = (16, 32, 64, 128, 256)  # head widths the sender tries, in principal components
STEPS = 1000  # head steps (train.train_head: minibatches of 512, AdamW, cosine)
TRAIN_LIMIT = 20_000  # the sender fits on at most this many target train images (a seeded subset)
HOLDOUT = 0.2  # ... of which this share is held out to choose the width and precision and to forecast
CHUNK = 16384


@dataclass(frozen=True)
class Basis:
    """The pool's PCA: mean of the unit-norm features, components (D x D, columns), spread per component."""

    mean: np.ndarray
    components: np.ndarray
    spread: np.ndarray

    def project(self, feats: np.ndarray, dim: int) -> np.ndarray:
        """Whitened coordinates on the first ``dim`` components, computed a chunk at a time."""
        out = np.empty((len(feats), dim), dtype=np.float32)
        comp, spread = self.components[:, :dim], self.spread[:dim]
        for a in range(0, len(feats), CHUNK):
            out[a:a + CHUNK] = ((_unit(np.asarray(feats[a:a + CHUNK], dtype=np.float32)) - self.mean) @ comp) / spread
        return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def basis(feats: np.ndarray, key: str | None = None) -> Basis:
    """The pool's PCA (see the module docstring), cached under ``key`` (the pool features' cache key).

    Two passes over the features, a chunk at a time, so a memory-mapped pool of any size costs D x D.
    """
    path = None
    if key is not None:
        tag = hashlib.sha256(f"head-basis-v1:{key}:{feats.shape}".encode()).hexdigest()[:20]
        path = cache_root() / "head" / f"{tag}.npy"
        try:
            packed = np.load(path)
            d = feats.shape[1]
            if packed.shape == (d + 2, d):
                return Basis(packed[0], packed[2:], packed[1])
        except (OSError, ValueError, EOFError):
            pass
    n, d = feats.shape
    if n < 2:
        raise PladaError("a head needs a pool of at least two images")
    mean = np.zeros(d, dtype=np.float64)
    for a in range(0, n, CHUNK):
        mean += _unit(np.asarray(feats[a:a + CHUNK], dtype=np.float32)).sum(0, dtype=np.float64)
    mean /= n
    cov = np.zeros((d, d), dtype=np.float64)
    for a in range(0, n, CHUNK):
        x = (_unit(np.asarray(feats[a:a + CHUNK], dtype=np.float32)) - mean).astype(np.float64)
        cov += x.T @ x
    vals, vecs = np.linalg.eigh(cov / n)
    vals, vecs = vals[::-1], vecs[:, ::-1]
    sign = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(d)])
    out = Basis(mean.astype(np.float32), (vecs * sign).astype(np.float32),
                np.sqrt(np.maximum(vals, 1e-12)).astype(np.float32))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(path, np.vstack([out.mean[None], out.spread[None], out.components]))
    return out


def quantise(w: np.ndarray, b: np.ndarray, bits: int, backbone: str, res: int) -> Head:
    """A float head as sent: per-class symmetric integers of ``bits`` bits, float16 scale and bias."""
    if bits not in HEAD_BITS:
        raise PladaError(f"head bits must be one of {HEAD_BITS}, got {bits}")
    top = 2 ** (bits - 1) - 1
    w, b = np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if not (np.isfinite(w).all() and np.isfinite(b).all()) or np.abs(w).max() / top > 6e4 or np.abs(b).max() > 6e4:
        raise PladaError("head weights are beyond what float16 scales can send: refit on better-scaled features")
    scale = (np.abs(w).max(1) / top).astype(np.float16).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(2 ** -14))  # an all-zero row still needs a positive scale
    q = np.clip(np.round(w / scale[:, None]), -top, top).astype(np.int8)
    return Head(backbone, res, bits, q, scale.astype(np.float16), np.asarray(b, dtype=np.float32).astype(np.float16))


def pool_logits(feats: np.ndarray, head: Head, pca: Basis) -> np.ndarray:
    """The head's logits for every pool row, a chunk at a time."""
    if head.dim > pca.components.shape[1]:
        raise PladaError(f"the payload's head uses {head.dim} components, but the features have only "
                         f"{pca.components.shape[1]}: not the backbone the sender used")
    w, b = head.dequantised()
    out = np.empty((len(feats), len(b)), dtype=np.float32)
    for a in range(0, len(feats), CHUNK):
        out[a:a + CHUNK] = pca.project(feats[a:a + CHUNK], head.dim) @ w.T + b
    return out


def fit(z: np.ndarray, labels: np.ndarray, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression on whitened coordinates (train.train_head, one thread: the head is small)."""
    # no per-feature standardisation: z is already whitened by the pool, and standardising a component on which
    # the target barely varies would blow its weight up past what float16 scales can send
    with torch_threads(1):
        w, b = train_head(z, labels, n_classes, steps=STEPS, seed=seed, standardise=False)
    return w.astype(np.float32), b.astype(np.float32)


@dataclass(frozen=True)
class Choice:
    """The head the sender sends, its held-out accuracy (the forecast) and every cell it compared."""

    head: Head
    forecast: float
    grid: list[dict]


def holdout_mask(n: int, seed: int = 0, groups: np.ndarray | None = None) -> np.ndarray:
    """The train rows `choose` holds out (HOLDOUT of them, seeded; whole groups when given), as a mask."""
    held = np.zeros(n, dtype=bool)
    if groups is None:
        held[np.random.default_rng(seed).permutation(n)[: max(1, int(round(HOLDOUT * n)))]] = True
    else:
        from .auto import fold_split

        held[fold_split(n, 1, seed, np.asarray(groups), frac=HOLDOUT)[0][1]] = True
    return held


def choose(train_f: np.ndarray, labels: np.ndarray, n_classes: int, pca: Basis, backbone: str, res: int,
           size_of, budget: int | None, seed: int = 0, groups: np.ndarray | None = None) -> Choice:
    """The most accurate (width, bits) on held-out train images whose payload fits ``budget`` bytes.

    ``size_of(head)`` is the payload's size with that head (the caller encodes it). Each cell's head is
    fitted on the rest of train; the one sent is refitted on all of it with the chosen cell, and kept
    only if it still fits (its Zstd size can differ by a byte or two), else the held-out fit is sent.
    Ties go to fewer bytes. The test split is never seen. With ``groups`` (one id per row, `auto.name_groups`)
    whole groups are held out, so near-copies of a held-out image (frames of one sign) do not sit in the fit
    rows and inflate the forecast.
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n < 10:
        raise PladaError(f"a head needs at least 10 labelled train images, got {n}")
    held = holdout_mask(n, seed, groups)
    grid, best = [], None
    for dim in [d for d in DIMS if d <= pca.components.shape[1]]:
        z = pca.project(train_f, dim)
        w, b = fit(z[~held], labels[~held], n_classes, seed)
        for bits in HEAD_BITS:
            h = quantise(w, b, bits, backbone, res)
            wq, bq = h.dequantised()
            acc = accuracy(z[held] @ wq.T + bq, labels[held])
            nbytes = size_of(h)
            grid.append({"dim": dim, "bits": bits, "bytes": nbytes, "holdout_accuracy": acc})
            fits = budget is None or nbytes <= budget
            if fits and (best is None or (acc, -nbytes) > (best[0], -best[1])):
                best = (acc, nbytes, dim, bits, h)
    if best is None:
        least = min(c["bytes"] for c in grid)
        raise PladaError(f"a budget of {budget} bytes cannot hold a head; the smallest needs {least} bytes")
    acc, _, dim, bits, held_head = best
    w, b = fit(pca.project(train_f, dim), labels, n_classes, seed)
    head = quantise(w, b, bits, backbone, res)
    if budget is not None and size_of(head) > budget:
        head = held_head
    return Choice(head, float(acc), grid)
