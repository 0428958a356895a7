"""Choose which reference-pool images survive into the distilled payload.

The payload is only labels for a shared pool, so its size is set by how many pool images are kept. Keeping
the images the teacher is most sure about (lowest energy, ``-T * logsumexp(logits / T)``) keeps the labels
that transfer best, but a pool that looks nothing like the target task piles almost every confident image
onto a few classes and rare classes vanish.

Safety-Net (from "A Dataset is Worth 1 MB"): reserve a share s of the kept budget so every class survives;
per-class quota K_c ∝ N_c^α (N_c = pseudo-label count of class c; α = 0.5 or −0.2); fill quotas with each
class's lowest-energy images, then the rest by global energy.

Everything here is phrased through a *rank key* where lower means "keep first", so one selection routine
serves every policy: for ``highest-energy`` the key is ``-energy``, so "lowest key" means highest energy.
Ties are always broken by pool index, which makes every result reproducible from (inputs, seed).

Exact quota rule (``safety_net_quotas``), with R = min(reserve, sum N_c) and m = number of classes with
N_c > 0:

1. Classes with N_c = 0 get 0 and take no further part.
2. If R >= m, every non-empty class first gets 1 (so every class survives); otherwise nobody gets a floor.
3. The R' seats still to give out go to non-empty classes with room left (quota < N_c), in proportion to
   w_c = N_c^α. Any class whose real-valued share exceeds its room is filled to N_c and dropped, and the
   seats left are shared again among the others with the same weights; repeat until no share exceeds its
   room (at least one class is dropped per round, so this ends).
4. The final real-valued shares are turned into integers by largest-remainder rounding: floor each share,
   then hand the seats left over to the largest fractional parts, ties going to the lower class index.
   A share never exceeds its room, so rounding up never breaks a cap.

Memory: selection streams. The pool is read in blocks of rows (`select_blocks`): one pass counts the
pseudo-labels (only when the Safety-Net reserves seats), one keeps, in bounded candidate buffers, the k
best rows overall and each class's best quota[c] rows. What it holds is O(k + classes + one block), never
an N-long ranking; `select` on whole arrays and `score.Scores.select` on a logits memmap both go through it,
and the result is exactly what a stable argsort of the whole key gives.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable

import numpy as np

from plada.errors import PladaError

POLICIES = ("lowest-energy", "highest-energy", "lowest-entropy", "random")
# Which per-image score each policy's key is made from (`block_keys`); random needs only the row count.
SCORE_OF = {"lowest-energy": "energy", "highest-energy": "energy", "lowest-entropy": "entropy", "random": None}
BLOCK_ROWS = 1 << 14  # rows per block when `select` streams over whole arrays


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding; the paper's budgets (and users) expect 0.5 to round up.
    return int(np.floor(x + 0.5))


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def budget(pool_size: int, keep: float | None = None, count: int | None = None) -> int:
    """Turn a user's "keep 1%" or "keep 5000" into one image count, so both spellings mean the same thing.

    A fraction never rounds down to an empty payload: at least one image is kept.
    """
    if not _is_int(pool_size) or pool_size < 1:
        raise PladaError(f"pool size must be a positive integer, got {pool_size!r}")
    if (keep is None) == (count is None):
        raise PladaError("give exactly one of keep (a fraction of the pool) or count (a number of images)")
    if keep is not None:
        if not _is_real(keep) or not np.isfinite(keep) or not 0.0 < keep <= 1.0:
            raise PladaError(f"keep must be a fraction in (0, 1], e.g. 0.01 for 1%; got {keep!r}")
        return max(1, _round_half_up(float(keep) * pool_size))
    if not _is_int(count) or not 1 <= count <= pool_size:
        raise PladaError(f"count must be an integer between 1 and the pool size {pool_size}; got {count!r}")
    return int(count)


def _as_vector(name: str, values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise PladaError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iuf":
        raise PladaError(f"{name} must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if np.isnan(arr).any():
        raise PladaError(f"{name} contains NaN; the teacher scores are corrupt")
    return arr


def rank_key(policy: str, energy: np.ndarray, entropy: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Express a selection policy as one float64 key (lower = keep first) so selection is policy-agnostic.

    ``random`` ignores the scores but still needs ``energy`` for the pool size; it is the ablation baseline
    and must be reproducible from ``seed``.
    """
    _check_policy(policy)
    e = _as_vector("energy", energy)
    if policy == "lowest-energy":
        return e.copy()
    if policy == "highest-energy":
        return -e
    if policy == "lowest-entropy":
        if entropy is None:
            raise PladaError("policy 'lowest-entropy' needs the teacher's entropy scores")
        h = _as_vector("entropy", entropy)
        if h.shape != e.shape:
            raise PladaError(f"entropy has {h.shape[0]} values but energy has {e.shape[0]}")
        return h.copy()
    _check_seed(seed)
    return np.random.default_rng(seed).random(e.shape[0])


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise PladaError(f"unknown selection policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _check_seed(seed: object) -> None:
    if not _is_int(seed):
        raise PladaError(f"seed must be an integer, got {seed!r}")


def block_keys(policy: str, seed: int = 0) -> Callable[[np.ndarray | int], np.ndarray]:
    """`rank_key` a block of rows at a time: a fresh key function for one pass over the pool in row order.

    Call it on each block's score, ``SCORE_OF[policy]`` (energy, or entropy for ``lowest-entropy``; for
    ``random`` the block's row count or anything of its length): the keys it returns, concatenated, are
    bit for bit what `rank_key` gives on the whole pool (``random`` draws the same generator stream).
    """
    _check_policy(policy)
    _check_seed(seed)
    if policy == "random":
        rng = np.random.default_rng(seed)
        return lambda s: rng.random(s if _is_int(s) else len(s))
    if policy == "highest-energy":
        return lambda e: -_as_vector("energy", e)
    name = SCORE_OF[policy]
    return lambda x: _as_vector(name, x).copy()


def order(key: np.ndarray) -> np.ndarray:
    """Rank the pool by key; a stable sort breaks ties by pool index so sender and tests agree exactly."""
    return np.argsort(np.asarray(key), kind="stable")


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Round real shares summing to ``total`` into integers with the same sum, ties to the lower index."""
    floors = np.floor(shares).astype(np.int64)
    left = total - int(floors.sum())
    frac = shares - floors
    if left > 0:
        # Largest fractional part first; lexsort's last key is primary, and the index breaks ties.
        pick = np.lexsort((np.arange(shares.size), -frac))[:left]
        floors[pick] += 1
    elif left < 0:  # only reachable through float error on enormous totals; undo the smallest fractions
        candidates = np.flatnonzero(floors > 0)
        pick = candidates[np.lexsort((-candidates, frac[candidates]))][:-left]
        floors[pick] -= 1
    return floors


def safety_net_quotas(class_counts: np.ndarray, reserve: int, alpha: float) -> np.ndarray:
    """Split the reserved seats across classes so rare classes survive a pool skewed towards a few classes.

    ``alpha > 0`` leans towards big classes, ``alpha < 0`` towards rare ones. See the module docstring for
    the exact rule; the quotas sum to exactly ``min(reserve, sum(class_counts))``.
    """
    counts = np.asarray(class_counts)
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise PladaError("class counts must be a 1-D integer array")
    if (counts < 0).any():
        raise PladaError("class counts must be non-negative")
    if not _is_int(reserve) or reserve < 0:
        raise PladaError(f"reserve must be a non-negative integer, got {reserve!r}")
    if not _is_real(alpha) or not np.isfinite(alpha):
        raise PladaError(f"alpha must be a finite number, got {alpha!r}")

    counts = counts.astype(np.int64)
    quotas = np.zeros(counts.size, dtype=np.int64)
    nonempty = counts > 0
    seats = min(int(reserve), int(counts.sum()))
    if seats == 0:
        return quotas
    if seats >= int(nonempty.sum()):
        quotas[nonempty] = 1
        seats -= int(nonempty.sum())

    # Weights in log space so large |alpha| on 14M-image classes cannot overflow; only ratios matter.
    log_w = np.full(counts.size, -np.inf)
    log_w[nonempty] = alpha * np.log(counts[nonempty].astype(np.float64))
    active = counts > quotas
    while seats > 0:
        idx = np.flatnonzero(active)
        w = np.exp(log_w[idx] - log_w[idx].max())
        shares = seats * w / w.sum()
        room = counts[idx] - quotas[idx]
        over = shares > room
        if not over.any():
            quotas[idx] += _largest_remainder(shares, seats)
            break
        full = idx[over]
        seats -= int(room[over].sum())
        quotas[full] = counts[full]
        active[full] = False
    return quotas


def select(
    labels: np.ndarray,
    key: np.ndarray,
    k: int,
    n_classes: int,
    safety_share: float = 0.0,
    alpha: float = 0.5,
) -> np.ndarray:
    """Keep ``k`` pool images: the Safety-Net quotas first, then the globally best by key.

    With ``safety_share = 0`` this is plain top-k by key. Returns sorted, unique int64 pool indices.
    Streams over the arrays (`select_blocks`): beyond its inputs it holds O(k + n_classes + a block).
    """
    _check_classes(n_classes)
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise PladaError("labels must be a 1-D integer array")
    keys = np.asarray(key)
    if keys.ndim != 1:
        raise PladaError(f"key must be a 1-D array, got shape {keys.shape}")
    if keys.dtype.kind not in "iuf":
        raise PladaError(f"key must be numeric, got dtype {keys.dtype}")
    n = lab.shape[0]
    if keys.shape[0] != n:
        raise PladaError(f"labels has {n} entries but key has {keys.shape[0]}")
    if n and (lab.min() < 0 or lab.max() >= n_classes):
        raise PladaError(f"labels must lie in [0, {n_classes}); found {lab.min()}..{lab.max()}")

    def blocks(with_keys: bool) -> Iterable[tuple[np.ndarray, np.ndarray | None]]:
        for a in range(0, n, BLOCK_ROWS):
            yield lab[a : a + BLOCK_ROWS], (keys[a : a + BLOCK_ROWS] if with_keys else None)

    return select_blocks(blocks, n, k, n_classes, safety_share=safety_share, alpha=alpha)[0]


def select_blocks(
    blocks: Callable[[bool], Iterable[tuple[np.ndarray, np.ndarray | None]]],
    n: int,
    k: int,
    n_classes: int,
    safety_share: float = 0.0,
    alpha: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """`select` over a pool given a block of rows at a time: (kept indices, sorted; their labels).

    ``blocks(with_keys)`` yields ``(labels, key)`` for consecutive row blocks from row 0 (``key`` may be
    None when ``with_keys`` is false); it is called once more, first and without keys, when the Safety-Net
    needs the class counts. Memory: the class counts, the candidate buffers (at most about 1.5k rows each) and
    one block; the result is exactly `select` on the concatenated arrays, ties broken by pool index.
    """
    _check_classes(n_classes)
    if not _is_int(n) or n < 0:
        raise PladaError(f"pool size must be a non-negative integer, got {n!r}")
    if not _is_int(k) or not 0 <= k <= n:
        raise PladaError(f"k must be an integer between 0 and the pool size {n}; got {k!r}")
    if not _is_real(safety_share) or not 0.0 <= safety_share <= 1.0:
        raise PladaError(f"safety share must be in [0, 1], got {safety_share!r}")

    reserve = _round_half_up(float(safety_share) * k)
    counts = np.zeros(n_classes, dtype=np.int64)
    if reserve > 0:  # the quotas need every class's size before the pass that keeps rows
        seen = 0
        for lab, _ in blocks(False):
            lab = _check_labels(lab, n_classes)
            counts += np.bincount(lab, minlength=n_classes)
            seen += lab.shape[0]
        _check_rows(seen, n)
    quotas = safety_net_quotas(counts, reserve, alpha)  # all zeros (alpha still checked) without a reserve

    rest = k - int(quotas.sum())  # seats for the best rows overall that no quota took: among the k best
    # Candidates are held compactly: pool index as int32 while it fits, the label in the least integer type.
    idx_t = np.int32 if n <= np.iinfo(np.int32).max else np.int64
    lab_t = np.min_scalar_type(n_classes - 1)
    best = _Lowest(np.array([k if rest else 0], dtype=np.int64), False, idx_t, lab_t)  # the k best overall
    per_class = _Lowest(quotas, True, idx_t, lab_t)  # each class's quota[c] best
    seen = 0
    for lab, key in blocks(True):
        lab = _check_labels(lab, n_classes)
        key = _as_vector("key", key)
        if key.shape[0] != lab.shape[0]:
            raise PladaError(f"a block has {lab.shape[0]} labels but {key.shape[0]} keys")
        rows = np.arange(seen, seen + lab.shape[0], dtype=idx_t)
        best.add(key, rows, lab)
        per_class.add(key, rows, lab)
        seen += lab.shape[0]
    _check_rows(seen, n)

    _, q_idx, q_lab = per_class.result()
    _, g_idx, g_lab = best.result()  # ranked by (key, index): the first `rest` not taken by a quota join them
    del per_class, best
    if rest:
        q_sorted = np.sort(q_idx)
        at = np.minimum(np.searchsorted(q_sorted, g_idx), max(q_sorted.size - 1, 0))
        free = np.flatnonzero(q_sorted[at] != g_idx if q_sorted.size else np.ones(g_idx.size, dtype=bool))[:rest]
        del q_sorted, at
        q_idx, q_lab = np.concatenate([q_idx, g_idx[free]]), np.concatenate([q_lab, g_lab[free]])
    del g_idx, g_lab
    o = np.argsort(q_idx)
    return q_idx[o].astype(np.int64), q_lab[o].astype(np.int64)


def _check_classes(n_classes: object) -> None:
    if not _is_int(n_classes) or n_classes < 1:
        raise PladaError(f"n_classes must be a positive integer, got {n_classes!r}")


def _check_rows(seen: int, n: int) -> None:
    if seen != n:
        raise PladaError(f"the blocks hold {seen} rows but the pool has {n}")


def _check_labels(labels: np.ndarray, n_classes: int) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise PladaError("labels must be a 1-D integer array")
    if lab.size and (lab.min() < 0 or lab.max() >= n_classes):
        raise PladaError(f"labels must lie in [0, {n_classes}); found {lab.min()}..{lab.max()}")
    return lab


class _Lowest:
    """The ``quota[g]`` lowest rows by (key, pool index) of each group g, kept while the rows stream past.

    Groups are the labels (``grouped``) or the whole pool (one group, ``quota[0]`` rows). Rows are added in
    pool order, so a newcomer whose key only ties a full group's worst loses the tie, and is dropped at
    once; the buffer is cut back to the quotas whenever it grows by half, so it holds at most about
    1.5·sum(quota) rows plus one block. What survives is exactly the first ``quota[g]`` rows of each group
    in a stable argsort of the whole key.
    """

    def __init__(self, quota: np.ndarray, grouped: bool, idx_t: type = np.int64, lab_t: type = np.int64) -> None:
        self.quota, self.grouped, self.idx_t, self.lab_t = quota, grouped, idx_t, lab_t
        self.cap = int(quota.sum())
        self.full = np.zeros(quota.size, dtype=bool)  # the group's quota is met by rows already seen...
        self.worst = np.zeros(quota.size, dtype=np.float64)  # ...the worst of which has this key
        self.keys: list[np.ndarray] = []
        self.rows: list[np.ndarray] = []
        self.labs: list[np.ndarray] = []
        self.size = 0

    def add(self, key: np.ndarray, idx: np.ndarray, lab: np.ndarray) -> None:
        if self.cap == 0 or key.size == 0:
            return
        if self.grouped:
            may = (self.quota[lab] > 0) & (~self.full[lab] | (key < self.worst[lab]))
        else:  # a tie with a full group's worst: the earlier row wins, so only a strictly lower key enters
            may = key < self.worst[0] if self.full[0] else np.ones(key.size, dtype=bool)
        keep = np.flatnonzero(may)
        if keep.size == 0:
            return
        self.keys.append(key[keep])
        self.rows.append(idx[keep].astype(self.idx_t, copy=False))
        self.labs.append(lab[keep].astype(self.lab_t, copy=False))
        self.size += keep.size
        if self.size > self.cap + max(self.cap // 2, 1):
            self._cut()

    @staticmethod
    def _join(parts: list[np.ndarray], dtype: type) -> np.ndarray:
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        parts.clear()  # the pieces go as soon as they are joined: one column is ever held twice
        return out

    def _cut(self) -> None:
        """Keep each group's quota, ranked by (group,) key, index; note the full groups and their worst key."""
        key = self._join(self.keys, np.float64)
        idx = self._join(self.rows, self.idx_t)
        lab = self._join(self.labs, self.lab_t)
        if self.grouped:
            o = np.lexsort((idx, key, lab))
            have = np.bincount(lab, minlength=self.quota.size)
            within = np.arange(o.size) - np.repeat(np.cumsum(have) - have, have)
            o = o[within < self.quota[lab[o]]]
            del within
        else:
            o = np.lexsort((idx, key))[: self.cap]
        key, idx, lab = key[o], idx[o], lab[o]
        g = lab if self.grouped else np.zeros(o.size, dtype=np.intp)
        self.full = (np.bincount(g, minlength=self.quota.size) >= self.quota) & (self.quota > 0)
        if o.size:
            last = np.r_[g[1:] != g[:-1], True]  # each group's worst kept row (rows are ranked within a group)
            self.worst[g[last]] = key[last]
        self.keys, self.rows, self.labs, self.size = [key], [idx], [lab], o.size

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(key, index, label) of the kept rows, ranked by (group,) key, index."""
        self._cut()
        return self.keys[0], self.rows[0], self.labs[0]


def class_histogram(labels: np.ndarray, indices: np.ndarray, n_classes: int) -> np.ndarray:
    """Count kept images per class, so reports can show which classes the selection starved."""
    lab = np.asarray(labels)
    idx = np.asarray(indices)
    if idx.size and (idx.dtype.kind not in "iu" or idx.min() < 0 or idx.max() >= lab.shape[0]):
        raise PladaError(f"indices must be integers in [0, {lab.shape[0]})")
    kept = lab[idx.astype(np.int64)]
    if kept.size and (kept.min() < 0 or kept.max() >= n_classes):
        raise PladaError(f"labels must lie in [0, {n_classes})")
    return np.bincount(kept, minlength=n_classes).astype(np.int64)
