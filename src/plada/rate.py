"""Selections that are cheap to describe: trade fidelity to the teacher for payload bytes.

Under the context codec (`plada.codec`) a kept image costs what its position and label add to its
group's code: a whole group kept costs almost nothing for positions, and a group whose kept images all
share one label costs almost nothing for labels. So the payload shrinks when the selection follows the
pool's folders and the labels agree within a folder. Two policies buy that, each with a knob:

- ``whole_groups``: keep the ``m`` groups with the lowest (or highest) mean energy, every image in them;
  labels are the teacher's, with minority labels of low confidence moved to the group's majority.
- ``majority_relabel``: any selection; inside each group, a kept image whose pseudo-label is not the
  group's majority (among the kept images) and whose teacher confidence (max softmax probability) is
  below ``tau`` takes the majority label. ``tau = 0`` changes nothing, ``tau = 1`` labels every group
  by its majority.

Every function is deterministic (ties go to the lower group, class or pool index) and returns sorted
unique pool indices with one label each, ready for `plada.payload.Payload`. Whether any of this pays
off is an empirical question per pool and target: `benchmarks/payload_rate.py` measures it, and a
third policy of its own (`groups_plus_exceptions`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from plada.data import map_rows
from plada.errors import PladaError


class Selection(NamedTuple):
    """Kept pool indices (sorted, unique) and the label sent for each."""

    indices: np.ndarray
    labels: np.ndarray


def confidence(logits: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Max softmax probability per row: how sure the teacher is of its hard label, in (0, 1].

    Computed `rows` rows at a time (`data.map_rows`): a pool's logits are a memmap, and a float64 copy of
    all of them is what this must not make."""
    x = logits if isinstance(logits, np.ndarray) else np.asarray(logits)
    if x.ndim != 2 or x.shape[1] < 1:
        raise PladaError(f"logits must be a 2-D (images, classes) array, got shape {x.shape}")
    return map_rows(_confidence, x, rows)


def _confidence(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(1, keepdims=True)
    return 1.0 / np.exp(z).sum(1)


def _check(labels: np.ndarray, groups: np.ndarray, n_classes: int, *others: tuple[str, np.ndarray]) -> tuple:
    lab = np.asarray(labels)
    grp = np.asarray(groups)
    if not isinstance(n_classes, int | np.integer) or n_classes < 1:
        raise PladaError(f"n_classes must be a positive integer, got {n_classes!r}")
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise PladaError("labels must be a 1-D integer array")
    if grp.shape != lab.shape or grp.dtype.kind not in "iu":
        raise PladaError(f"groups must be one integer per pool image ({lab.shape[0]}), got shape {grp.shape}")
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise PladaError(f"labels must lie in [0, {n_classes})")
    if grp.size and grp.min() < 0:
        raise PladaError("group ids must be non-negative")
    out = [lab.astype(np.int64, copy=False), grp.astype(np.int64, copy=False)]
    for name, arr in others:
        a = np.asarray(arr, dtype=np.float64)
        if a.shape != lab.shape:
            raise PladaError(f"{name} must have one value per pool image ({lab.shape[0]}), got shape {a.shape}")
        if np.isnan(a).any():
            raise PladaError(f"{name} contains NaN; the teacher scores are corrupt")
        out.append(a)
    return tuple(out)


def _majority(groups: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority label per group id (ties to the lower class); groups without images get 0."""
    n_groups = int(groups.max()) + 1 if groups.size else 0
    hist = np.zeros((n_groups, n_classes), dtype=np.int64)
    np.add.at(hist, (groups, labels), 1)
    return hist.argmax(1) if n_groups else np.zeros(0, dtype=np.int64)


def majority_relabel(
    indices: np.ndarray, labels: np.ndarray, groups: np.ndarray, conf: np.ndarray, tau: float, n_classes: int,
) -> Selection:
    """Move low-confidence minority labels to their group's majority, so each group codes fewer classes.

    ``labels``, ``groups`` and ``conf`` are per pool image; the majority is taken over the *kept* images
    of each group, so it is the label the payload already spends most of the group's bits on.
    """
    lab, grp, cf = _check(labels, groups, n_classes, ("confidence", conf))
    if not isinstance(tau, int | float | np.floating) or not 0.0 <= float(tau) <= 1.0:
        raise PladaError(f"relabel threshold tau must be in [0, 1], got {tau!r}")
    idx = np.unique(np.asarray(indices, dtype=np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= lab.size):
        raise PladaError(f"indices must lie in [0, {lab.size})")
    kept_lab, kept_grp = lab[idx].copy(), grp[idx]
    if idx.size and tau > 0:
        maj = _majority(kept_grp, kept_lab, n_classes)[kept_grp]
        move = (kept_lab != maj) & (cf[idx] < float(tau))
        kept_lab[move] = maj[move]
    return Selection(idx, kept_lab)


def group_order(energy: np.ndarray, groups: np.ndarray, highest: bool = False) -> np.ndarray:
    """Group ids ranked by mean energy, most target-like first (or least, for far-OOD targets)."""
    e = np.asarray(energy, dtype=np.float64)
    grp = np.asarray(groups, dtype=np.int64)
    n_groups = int(grp.max()) + 1 if grp.size else 0
    sizes = np.bincount(grp, minlength=n_groups)
    sums = np.bincount(grp, weights=e, minlength=n_groups)
    present = np.flatnonzero(sizes)
    mean = sums[present] / sizes[present]
    return present[np.argsort(-mean if highest else mean, kind="stable")]


def whole_groups(
    labels: np.ndarray, energy: np.ndarray, groups: np.ndarray, conf: np.ndarray, n_groups: int, n_classes: int,
    tau: float = 0.0, highest: bool = False,
) -> Selection:
    """Keep every image of the ``n_groups`` best groups: positions then cost almost nothing."""
    lab, grp, e, _ = _check(labels, groups, n_classes, ("energy", energy), ("confidence", conf))
    if not isinstance(n_groups, int | np.integer) or n_groups < 0:
        raise PladaError(f"number of groups must be a non-negative integer, got {n_groups!r}")
    chosen = group_order(e, grp, highest)[: int(n_groups)]
    idx = np.flatnonzero(np.isin(grp, chosen)).astype(np.int64)
    return majority_relabel(idx, lab, grp, conf, tau, n_classes)


def whole_groups_upto(
    labels: np.ndarray, energy: np.ndarray, groups: np.ndarray, conf: np.ndarray, k: int, n_classes: int,
    tau: float = 0.0, highest: bool = False,
) -> Selection:
    """``whole_groups`` with as many groups as fit in ``k`` images, so a size search over k can drive it.

    Groups are taken in energy order while the running total stays within ``k``; it may keep nothing.
    """
    grp = np.asarray(groups, dtype=np.int64)
    if not isinstance(k, int | np.integer) or k < 0:
        raise PladaError(f"size must be a non-negative integer, got {k!r}")
    ranked = group_order(energy, grp, highest)
    sizes = np.bincount(grp, minlength=int(grp.max()) + 1 if grp.size else 0)[ranked]
    m = int(np.searchsorted(np.cumsum(sizes), int(k), side="right"))
    return whole_groups(labels, energy, grp, conf, m, n_classes, tau, highest)
