"""What a selection costs under each codec, measured for the benchmarks rather than sent.

- `index_costs`: stored bytes of the paper's index codecs (gap list, bitmap; Zstd) and of the raw
  baseline (benchmarks/paper.py);
- `ideal_bits`: the reference code length the context codec is judged against, and `model_bits`: the
  context codec's own code length part by part, so the range coder's overhead can be measured
  (scripts/codec_scale.py, tests/test_codec.py).

They call the private helpers of `plada.payload` and `plada.codec` on purpose: a measure of the codecs
must do their arithmetic, not a copy of it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from plada.codec import Grouping, _check, _items, _label_choice, _log2_binom, _position_bits
from plada.errors import PayloadError, PladaError
from plada.payload import (
    BITMAP_MAX_BITS,
    MAX_POOL_SIZE,
    _bitmap_raw,
    _check_indices,
    _check_level,
    _compress,
    _gap_raw,
    _int_array,
    _is_int,
)


def index_costs(
    indices: Any,
    pool_size: int,
    level: int = 19,
    *,
    labels: Any = None,
    n_classes: int | None = None,
) -> dict[str, int]:
    """Stored bytes of each way to send a selection.

    ``raw`` is the uncompressed baseline of one bit per pool image, plus ceil(log2 C) bits per kept
    image when labels or ``n_classes`` are given: ceil((N + k * ceil(log2 C)) / 8). ``gap_zstd`` and
    ``bitmap_zstd`` are the index section alone (the labels section is the same for both); the bitmap
    is always built here, even where `plada.payload.encode` would skip it, as long as N <= 2**31.
    """
    if not _is_int(pool_size) or not 0 < pool_size <= MAX_POOL_SIZE:
        raise PladaError(f"pool_size {pool_size!r} out of range (must be 1..2**40)")
    pool_size = int(pool_size)
    if pool_size > BITMAP_MAX_BITS:
        raise PladaError(f"pool_size {pool_size} too large for a bitmap (limit {BITMAP_MAX_BITS})")
    level = _check_level(level)
    idx = _check_indices(indices, pool_size)
    label_bits = 0
    if labels is not None or n_classes is not None:
        if n_classes is None:
            lab = _int_array(labels, "labels")
            n_classes = int(lab.max()) + 1 if lab.size else 1
        if not _is_int(n_classes) or n_classes < 1:
            raise PladaError(f"n_classes must be a positive integer, got {n_classes!r}")
        label_bits = (int(n_classes) - 1).bit_length()  # == ceil(log2 C), 0 for one class
    return {
        "raw": math.ceil((pool_size + idx.size * label_bits) / 8),
        "gap_zstd": len(_compress(_gap_raw(idx), level)),
        "bitmap_zstd": len(_compress(_bitmap_raw(idx, pool_size), level)),
    }


def ideal_bits(indices: Any, labels: Any, n_classes: int, groups: Any = None, pool_size: int | None = None) -> float:
    """The reference code length: Σ_g [log2(n_g+1) + log2 C(n_g, k_g)] + Σ_g KT(labels in g).

    ``pool_size`` defaults to ``len(groups)``; without groups it is required.
    """
    pool_size = _pool_size_of(groups, pool_size)
    gr, idx, lab = _check(indices, labels, pool_size, n_classes, groups)
    _, group, lab = _items(gr, idx, lab)
    kept = np.bincount(group, minlength=gr.count).astype(np.int64)
    bits = float(np.log2(gr.sizes + 1.0).sum()) + _log2_binom(gr.sizes, kept)
    hist = np.unique(group * n_classes + lab, return_counts=True)[1]
    return bits + _dirmult_bits(hist, kept, n_classes, 0.5)


def model_bits(
    indices: Any, labels: Any, n_classes: int, groups: Any = None, pool_size: int | None = None
) -> dict[str, Any]:
    """The context codec's own code length, part by part (to ~1e-9), so the coder's overhead can be measured."""
    pool_size = _pool_size_of(groups, pool_size)
    gr, idx, lab = _check(indices, labels, pool_size, n_classes, groups)
    _, group, lab = _items(gr, idx, lab)
    sizes = gr.sizes
    kept = np.bincount(group, minlength=gr.count).astype(np.int64)
    count = idx.size
    typed, whole = _position_bits(sizes, kept, count)
    choose = sizes.size > 1 and 0 < count < pool_size
    positions = (1.0 if choose else 0.0) + (min(typed, whole) if choose else typed)
    choice = {"kind": 0, "exponent": 0, "global": 0, "bits": 0.0}
    if count and n_classes >= 2:
        choice = _label_choice(kept, group, lab, n_classes)
    return {
        "positions": positions,
        "positions_flat": bool(choose and whole < typed),
        "labels": choice["bits"],
        "label_prior": {"kind": ("symmetric", "global")[choice["kind"]], "exponent": choice["exponent"]},
        "total": positions + choice["bits"],
    }


def _pool_size_of(groups: Any, pool_size: int | None) -> int:
    if pool_size is not None:
        return pool_size
    if groups is None:
        raise PayloadError("pool_size is needed when there are no groups")
    return groups.pool_size if isinstance(groups, Grouping) else len(groups)


def _dirmult_bits(hist: np.ndarray, kept: np.ndarray, n_classes: int, alpha: float) -> float:
    """-log2 of every group's label sequence under a symmetric Dirichlet(alpha) prior (KT: 1/2), exactly."""
    if hist.size == 0:
        return 0.0
    lg = np.frompyfunc(math.lgamma, 1, 1)
    vals, inv = np.unique(hist, return_inverse=True)
    per_count = lg(vals + alpha).astype(np.float64) - math.lgamma(alpha)
    mv, minv = np.unique(kept[kept > 0], return_inverse=True)
    per_group = lg(mv + n_classes * alpha).astype(np.float64) - math.lgamma(n_classes * alpha)
    nats = float(per_group[minv.reshape(-1)].sum()) - float(per_count[inv.reshape(-1)].sum())
    return nats / math.log(2)
