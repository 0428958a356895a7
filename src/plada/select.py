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
"""

from __future__ import annotations

import numbers

import numpy as np

from plada.errors import PladaError

POLICIES = ("lowest-energy", "highest-energy", "lowest-entropy", "random")


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
    if policy not in POLICIES:
        raise PladaError(f"unknown selection policy {policy!r}; choose one of {', '.join(POLICIES)}")
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
    if not _is_int(seed):
        raise PladaError(f"seed must be an integer, got {seed!r}")
    return np.random.default_rng(seed).random(e.shape[0])


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
    """
    if not _is_int(n_classes) or n_classes < 1:
        raise PladaError(f"n_classes must be a positive integer, got {n_classes!r}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.dtype.kind not in "iu":
        raise PladaError("labels must be a 1-D integer array")
    keys = _as_vector("key", key)
    n = lab.shape[0]
    if keys.shape[0] != n:
        raise PladaError(f"labels has {n} entries but key has {keys.shape[0]}")
    if n and (lab.min() < 0 or lab.max() >= n_classes):
        raise PladaError(f"labels must lie in [0, {n_classes}); found {lab.min()}..{lab.max()}")
    if not _is_int(k) or not 0 <= k <= n:
        raise PladaError(f"k must be an integer between 0 and the pool size {n}; got {k!r}")
    if not _is_real(safety_share) or not 0.0 <= safety_share <= 1.0:
        raise PladaError(f"safety share must be in [0, 1], got {safety_share!r}")

    ranking = order(keys)
    reserve = _round_half_up(float(safety_share) * k)
    counts = np.bincount(lab, minlength=n_classes).astype(np.int64)
    quotas = safety_net_quotas(counts, reserve, alpha)

    taken = np.zeros(n, dtype=bool)
    if quotas.any():
        # Group the key-ordered pool by class (stable, so each group stays in key order), then keep the
        # first quota[c] of each group: no per-image or per-class Python loop.
        grouped = ranking[np.argsort(lab[ranking], kind="stable")]
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        within = np.arange(n) - starts
        taken[grouped[within < np.repeat(quotas, counts)]] = True
    rest = k - int(quotas.sum())
    if rest > 0:
        taken[ranking[~taken[ranking]][:rest]] = True
    return np.flatnonzero(taken).astype(np.int64)


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
