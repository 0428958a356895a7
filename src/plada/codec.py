"""Context coding of a selection: which pool images are kept, and their labels, given the pool's groups.

Zstd on a gap list spends about the same bits on every kept image. A selection is cheaper to describe
per group (the pool's folders): how many images a group keeps, which ones, and labels drawn from the
few classes that group actually uses. This module codes exactly that with `constriction`'s range
coder. It is used by `plada.payload` as the ``joint`` section (codec ``ctx-range``); callers normally
go through `plada.payload.encode` / `decode`.

Model, for a pool of N images partitioned into G groups of sizes n_g, k_g of them kept:

1. Group counts. Each group is empty, full or partial. The number of partial groups G2 and of full
   groups G1 are uniform; which groups are partial is a uniform G2-subset of the G groups, which are
   full a uniform G1-subset of the rest; a partial group's count is uniform in [1, n_g - 1]. This is
   never more than a few dozen bits above the reference Σ_g log2(n_g + 1), and far below it when
   most groups are empty or full (clustered selections, whole-group policies).
2. Label prior. One exponent s, D = 2**s: each group's labels follow a Dirichlet(1/D) prior, the
   Krichevsky-Trofimov estimator when D = 2. The encoder picks the D with the shortest code.
3. Label histograms. Per group, the class histogram under that Dirichlet-multinomial, coded down a
   balanced binary tree over the classes: at a node with m labels and C_L, C_R classes below its two
   children, the left count is beta-binomial(m, C_L/D, C_R/D). Exact by the aggregation property.
4. Subsets. Which positions of a partial group are kept (a k_g-subset of n_g), and at every class
   node which of its m labelled images go left (an m_L-subset of m): each subset is coded down a
   binary tree over its slots, the left half's count being hypergeometric. The product of those
   probabilities is exactly 1 / C(n, k).

Steps 3 and 4 together cost exactly the KT code length (D = 2) plus log2 C(n_g, k_g) per group, but
unlike sequential adaptive coding every tree level of every group is one batched call, so decoding
takes O(log N + log C) rounds of vectorised work rather than one Python step per image. Shortcuts
with the same probabilities keep the trees shallow: a subset node with one slot chosen (or one left
out) codes that slot uniformly, a node of at most 16 slots codes its subset's rank among all
C(n, k), and a class node holding one image codes its class uniformly. Order in the stream: the
counts, the partial groups' positions, the prior, then per class level its splits and subsets.

Decoding must reproduce the encoder's probabilities bit for bit, on any machine. Every probability
table is therefore built from exact integers with IEEE-754 +, -, *, /, sqrt and running products
only (no exp, log or gamma, whose last bit differs between libm builds); `constriction` quantises
them deterministically. Tables are relative to their largest entry, so products never overflow.

Tables are also bounded: a split's table covers its mean +- 6 standard deviations (8 for label splits
whose beta-binomial is log-concave; heavier-tailed ones keep their whole support), at most 2**16
cells, plus two escape cells after which the value is coded uniformly within the tail. Honest
random-looking data essentially never escapes; structured data (a folder's first half kept)
escapes for about 24 bits, far below what the exact model would charge.

Untrusted streams: every decoded symbol is range-checked and the group counts must add up to the
header's count. Work is O(G log G + count log N log C) table cells; memory is the caller's group
array plus about 100 bytes per kept image, one class level being held at a time. `MAX_POOL` and
`MAX_COUNT` cap both: at the limits a garbage stream cost at most about 8 s and 400 MB here.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import constriction
import numpy as np

from plada.errors import PayloadError

MAX_POOL = 1 << 31  # keeps every product in the probability tables exact in int64 / float64
MAX_COUNT = 1 << 22  # the codec's work grows with the count; bigger selections use gap-zstd
MAX_CLASSES = 65535
PRIOR_EXPONENTS = 16  # label prior Dirichlet(2**-s) for s = 1..16; s = 1 is KT

_CELLS_PER_CALL = 1 << 19  # probability-table cells per constriction call (4 MiB of float64)
_HALF_WINDOW = 1 << 15  # tables never exceed 2 * this + 3 cells, however large a node
_FOREST_CHUNK = 1 << 20  # bounds the nodes alive in one subset-forest level
_LEAF = 16  # subsets of at most this many slots are coded by rank: C(16, 8) < 2**16
_UNIFORM_DIRECT = 1 << 16
_UNIFORM_LOW_BITS = 12
_CAT = constriction.stream.model.Categorical(perfect=False)
_UNI = constriction.stream.model.Uniform()


# ---------------------------------------------------------------------------------------------- groups


@dataclass(frozen=True, eq=False)
class Grouping:
    """A partition of the pool into groups, reduced to what the coder depends on.

    Only the partition matters, not the ids: groups are ordered by first appearance in pool order.
    ``members`` lists pool indices group after group (in pool order within each group); it is None
    when every group is one contiguous run, the usual case for a folder-sorted manifest, so that
    grouped position and pool index coincide and nothing of size N has to be built.
    """

    pool_size: int
    sizes: np.ndarray  # int64[G], > 0
    starts: np.ndarray  # int64[G], exclusive prefix sums of sizes
    members: np.ndarray | None
    digest: str  # sha256 of the partition, so sender and receiver can tell they agree

    @property
    def count(self) -> int:
        return int(self.sizes.size)


def grouping(groups: Any, pool_size: int) -> Grouping:
    """Canonical form of a group-id array (``Pool.groups()[0]``), or one group when ``groups`` is None."""
    if not isinstance(pool_size, (int, np.integer)) or not 0 < pool_size <= MAX_POOL:
        raise PayloadError(f"pool_size {pool_size!r} out of range for the context codec (1..{MAX_POOL})")
    pool_size = int(pool_size)
    if isinstance(groups, Grouping):
        if groups.pool_size != pool_size:
            raise PayloadError(f"groups cover {groups.pool_size} images, the pool has {pool_size}")
        return groups
    if groups is None:
        sizes = np.array([pool_size], dtype=np.int64)
        return Grouping(pool_size, sizes, np.zeros(1, np.int64), None, _digest(pool_size, sizes, None))
    arr = np.asarray(groups)
    if arr.ndim != 1 or arr.size != pool_size:
        raise PayloadError(f"groups must be a 1-D array with one id per pool image ({pool_size}), got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise PayloadError(f"groups must be integer ids, got dtype {arr.dtype}")
    run_starts = np.flatnonzero(np.r_[True, arr[1:] != arr[:-1]])
    run_ids = arr[run_starts]
    if np.unique(run_ids).size == run_ids.size:  # each group is one run: no permutation needed
        sizes = np.diff(np.r_[run_starts, pool_size]).astype(np.int64)
        starts = run_starts.astype(np.int64)
        return Grouping(pool_size, sizes, starts, None, _digest(pool_size, sizes, None))
    _, first, inverse = np.unique(arr, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    canonical = rank[inverse.reshape(-1)]
    sizes = np.bincount(canonical, minlength=first.size).astype(np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
    members = np.argsort(canonical, kind="stable").astype(np.int64)
    return Grouping(pool_size, sizes, starts, members, _digest(pool_size, sizes, canonical))


def _digest(pool_size: int, sizes: np.ndarray, canonical: np.ndarray | None) -> str:
    h = hashlib.sha256(b"plada-groups-v1\x00")
    h.update(np.array([pool_size, sizes.size, canonical is not None], dtype="<i8").tobytes())
    h.update(sizes.astype("<i8").tobytes())
    if canonical is not None:
        h.update(canonical.astype("<u4" if sizes.size < 2**32 else "<i8").tobytes())
    return h.hexdigest()


def _grouped_positions(gr: Grouping, indices: np.ndarray) -> np.ndarray:
    """Pool indices -> positions in the grouped layout (group after group)."""
    if gr.members is None:
        return indices
    inv = np.empty(gr.pool_size, dtype=np.int64)
    inv[gr.members] = np.arange(gr.pool_size, dtype=np.int64)
    return inv[indices]


# ---------------------------------------------------------------------------------------------- channel


class _Encoder:
    decoding = False

    def __init__(self) -> None:
        self.coder = constriction.stream.queue.RangeEncoder()

    def categorical(self, probs: np.ndarray, widths: np.ndarray, symbols: np.ndarray) -> np.ndarray:
        if symbols.size:
            self.coder.encode(symbols.astype(np.int32), _CAT, probs)
        return symbols

    def uniform(self, sizes: np.ndarray, values: np.ndarray) -> np.ndarray:
        if values.size:
            self.coder.encode(values.astype(np.int32), _UNI, sizes.astype(np.int32))
        return values

    def finish(self) -> bytes:
        return self.coder.get_compressed().astype("<u4").tobytes()


class _Decoder:
    decoding = True

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise PayloadError(f"joint section length {len(data)} is not a whole number of 32-bit words")
        self.words = np.frombuffer(data, dtype="<u4").astype(np.uint32)
        self.coder = constriction.stream.queue.RangeDecoder(self.words)
        self.log: list[tuple[Any, np.ndarray, np.ndarray]] = []  # every decoded batch, replayed by `finish`

    def categorical(self, probs: np.ndarray, widths: np.ndarray, symbols: None = None) -> np.ndarray:
        if not widths.size:
            return np.zeros(0, dtype=np.int64)
        out = self._decode(_CAT, probs)
        if bool(np.any(out >= widths)):
            raise PayloadError("joint section decodes to a value outside its range")
        return out

    def uniform(self, sizes: np.ndarray, values: None = None) -> np.ndarray:
        if not sizes.size:
            return np.zeros(0, dtype=np.int64)
        return self._decode(_UNI, sizes.astype(np.int32))

    def _decode(self, model: Any, params: np.ndarray) -> np.ndarray:
        try:
            out = np.asarray(self.coder.decode(model, params), dtype=np.int64)
        except (AssertionError, ValueError, RuntimeError, OverflowError) as e:
            raise PayloadError(f"joint section is corrupt: {' '.join(str(e).split())[:120]}") from None
        self.log.append((model, params, out))
        return out

    def finish(self) -> None:
        """Refuse any word the coder's seal would not have written for the symbols decoded.

        The range decoder reads ahead, so `maybe_exhausted` lets one extra word through; replaying the
        decoded symbols into an encoder gives the one sealed word sequence they have, whatever choices the
        writer made (its choices are symbols too), and the section must be exactly that.
        """
        if not self.coder.maybe_exhausted():
            raise PayloadError("joint section has trailing data after the coded selection")
        enc = constriction.stream.queue.RangeEncoder()
        for model, params, out in self.log:
            enc.encode(out.astype(np.int32), model, params)
        if not np.array_equal(enc.get_compressed().astype(np.uint32), self.words):
            raise PayloadError("joint section is not the coder's sealed output for what it decodes to "
                               "(trailing or altered words)")


_Channel = _Encoder | _Decoder


def _uniform(ch: _Channel, sizes: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Values uniform in [0, size); sizes past the coder's 24-bit precision go as two digits."""
    sizes = sizes.astype(np.int64)
    out = np.zeros(sizes.size, dtype=np.int64)
    direct = sizes <= _UNIFORM_DIRECT
    hi_size = np.where(direct, sizes, ((sizes - 1) >> _UNIFORM_LOW_BITS) + 1)
    first = hi_size >= 2
    v = None if values is None else np.where(direct, values, values >> _UNIFORM_LOW_BITS)
    hi = np.zeros(sizes.size, dtype=np.int64)
    hi[first] = ch.uniform(hi_size[first], None if v is None else v[first])
    big = ~direct
    lo_size = np.where(hi == hi_size - 1, ((sizes - 1) & ((1 << _UNIFORM_LOW_BITS) - 1)) + 1, 1 << _UNIFORM_LOW_BITS)
    second = big & (lo_size >= 2)
    lo = np.zeros(sizes.size, dtype=np.int64)
    mask = (1 << _UNIFORM_LOW_BITS) - 1
    lo[second] = ch.uniform(lo_size[second], None if values is None else values[second] & mask)
    out[direct] = hi[direct]
    out[big] = (hi[big] << _UNIFORM_LOW_BITS) + lo[big]
    return out


# ---------------------------------------------------------------------------------------------- tables


def _bit_length(x: np.ndarray) -> np.ndarray:
    return np.frexp(x.astype(np.float64))[1].astype(np.int64)  # exact for x < 2**53


def _rows(
    ch: _Channel, builder: Any, params: dict[str, np.ndarray], widths: np.ndarray, symbols: np.ndarray | None
) -> np.ndarray:
    """Code one symbol per row, rows batched by table width (padded to a power of two)."""
    out = np.zeros(widths.size, dtype=np.int64)
    if not widths.size:
        return out
    bucket = _bit_length(widths - 1)
    order = np.argsort(bucket, kind="stable")
    edges = np.flatnonzero(np.r_[True, bucket[order][1:] != bucket[order][:-1], True])
    for a, b in zip(edges[:-1], edges[1:], strict=False):
        rows = order[a:b]
        width = 1 << int(bucket[rows[0]])
        step = max(1, _CELLS_PER_CALL // width)
        for c in range(0, rows.size, step):
            sel = rows[c : c + step]
            table = builder(width, {key: val[sel] for key, val in params.items()})
            out[sel] = ch.categorical(table, widths[sel], None if symbols is None else symbols[sel])
    return out


def _windowed(
    ch: _Channel,
    builder: Any,
    params: dict[str, np.ndarray],
    support: tuple[np.ndarray, np.ndarray],
    window: tuple[np.ndarray, np.ndarray],
    values: np.ndarray | None,
) -> np.ndarray:
    """Code values in [lo, hi] with a table over the window [a, b] only, plus two escape cells.

    Cells outside the window are astronomically unlikely for honest data (or, for the widest rows,
    simply beyond the table cap); an escape costs at most about 24 bits plus a uniform offset into
    that tail, and it bounds the table, hence work and memory, whatever a stream claims.
    """
    (lo, hi), (a, b) = support, window
    windowed = (a > lo) | (b < hi)
    inside = b - a + 1
    sym = None
    if values is not None:
        sym = np.where(values < a, inside, np.where(values > b, inside + 1, values - a))
    sym = _rows(ch, builder, {**params, "lo": a, "hi": b}, inside + 2 * windowed, sym)
    esc_lo = windowed & (sym == inside)
    esc_hi = windowed & (sym == inside + 1)
    esc = esc_lo | esc_hi
    tail = np.where(esc_lo, a - lo, hi - b)[esc]
    if bool(np.any(tail < 1)):
        raise PayloadError("joint section escapes to an empty tail")
    offset = None if values is None else np.where(esc_lo, values - lo, values - b - 1)[esc]
    offset = _uniform(ch, tail, offset)
    out = a + sym
    out[esc] = np.where(esc_lo[esc], lo[esc] + offset, b[esc] + 1 + offset)
    return out


def _reach(var: np.ndarray, sds: float) -> np.ndarray:
    """Window half-width: `sds` standard deviations (IEEE sqrt is exact-rounded), at most `_HALF_WINDOW`."""
    return np.minimum((sds * np.sqrt(var)).astype(np.int64) + 2, _HALF_WINDOW)


def _hyper_table(width: int, p: dict[str, np.ndarray]) -> np.ndarray:
    """Hypergeometric: P(j of the k chosen slots fall in the left nL of n = nL + nR), j from lo.

    Relative to the mode, so that every running product of ratios stays in (0, 1].
    """
    f = np.float64
    k, nl, nr, lo, hi = (p[x].astype(f)[:, None] for x in ("k", "nl", "nr", "lo", "hi"))
    mode = np.clip(p["mode"][:, None], p["lo"][:, None], p["hi"][:, None]).astype(f)
    j = lo + np.arange(width, dtype=f)[None, :]
    # r_j = P(j+1)/P(j) = num_j / den_j; every factor is an exact integer below 2**53.
    num = (k - j) * (nl - j)
    den = (j + 1.0) * (nr - k + j + 1.0)
    up = np.ones_like(num)
    with np.errstate(divide="ignore", invalid="ignore"):
        up[:, 1:] = np.where(j[:, 1:] > mode, num[:, :-1] / den[:, :-1], 1.0)
        down = np.where(j < mode, den / num, 1.0)
        table = np.cumprod(up, axis=1) * np.cumprod(down[:, ::-1], axis=1)[:, ::-1]
    table[j > hi] = 0.0
    return table


def _hyper_mode(k: np.ndarray, nl: np.ndarray, nr: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    # r_j >= 1 exactly when j + 1 <= (k+1)(nL+1)/(n+2), so this is the first j with r_j < 1.
    return np.clip(((k + 1) * (nl + 1)) // (nl + nr + 2), lo, hi)


def _beta_binomial_shape(m: np.ndarray, cl: np.ndarray, cr: np.ndarray, d: np.ndarray) -> dict[str, np.ndarray]:
    """Mode, valley and U-shape flag of beta-binomial(m, cl/D, cr/D), in exact integer arithmetic.

    r_j = P(j+1)/P(j) = (m-j)(Dj+cl) / ((j+1)(D(m-j-1)+cr)), and r_j >= 1 iff s(j) = s0 + j*slope >= 0.
    slope < 0: unimodal, the mode is the first j with s(j) < 0. slope == 0: monotone. slope > 0:
    U-shaped, falling to the valley v = first j with s(j) >= 0, then rising to j = m.
    """
    slope = 2 * d - (cl + cr)
    s0 = m * (cl - d) + d - cr
    safe = np.where(slope == 0, 1, np.abs(slope))
    mode = np.where(slope < 0, s0 // safe + 1, np.where(s0 >= 0, m, 0))
    valley = np.clip(-(s0 // safe), 0, m)
    mode = np.clip(np.where(slope > 0, np.where(valley == 0, m, 0), mode), 0, m)
    u_shape = (slope > 0) & (valley > 0) & (valley < m)
    return {"mode": mode, "valley": valley, "u": u_shape.astype(np.int64)}


def _beta_binomial_table(width: int, p: dict[str, np.ndarray]) -> np.ndarray:
    """Beta-binomial(m, cl/D, cr/D) over j = lo..hi: the left child's share of a class node's labels.

    Relative to the mode (clipped into the window), or for U-shaped rows (never windowed) to their
    higher end, so every running product of ratios stays in (0, 1].
    """
    mi, cli, cri, di, loi, hii, mode, valley, u = (
        p[x][:, None] for x in ("m", "cl", "cr", "d", "lo", "hi", "mode", "valley", "u")
    )
    u = u.astype(bool)
    mode = np.clip(mode, loi, hii)
    ji = loi + np.arange(width, dtype=np.int64)[None, :]
    f = np.float64
    m, cl, cr, d, j = mi.astype(f), cli.astype(f), cri.astype(f), di.astype(f), ji.astype(f)
    num = (m - j) * (d * j + cl)
    den = (j + 1.0) * (d * (m - j - 1.0) + cr)
    up_cell = np.where(u, (ji >= 1) & (ji < valley), ji > mode)
    down_cell = np.where(u, (ji >= valley) & (ji < mi), ji < mode)
    up = np.ones_like(num)
    with np.errstate(divide="ignore", invalid="ignore"):
        up[:, 1:] = np.where(up_cell[:, 1:], num[:, :-1] / den[:, :-1], 1.0)
        down = np.where(down_cell, den / num, 1.0)
        left = np.cumprod(up, axis=1)
        right = np.cumprod(down[:, ::-1], axis=1)[:, ::-1]
        table = left * right
    if bool(u.any()):
        # Both ends are local maxima; rho = P(m)/P(0) = prod_{i<m} (Di+cl)/(Di+cr) puts them on one scale.
        ratio = np.where(ji < mi, (d * j + cl) / (d * j + cr), 1.0)
        rho = np.cumprod(ratio, axis=1)[:, -1:]
        scale_left = np.where(rho > 1.0, 1.0 / rho, 1.0)
        scale_right = np.where(rho > 1.0, 1.0, rho)
        table = np.where(u, np.where(ji < valley, left * scale_left, right * scale_right), table)
    table[ji > hii] = 0.0
    return table


# ---------------------------------------------------------------------------------------------- subsets


@functools.cache
def _colex() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Binomials, and colexicographic rank / unrank tables for subsets of at most `_LEAF` slots.

    The colex rank sum_i C(p_i, i+1) of a k-subset does not depend on n, and the k-subsets of
    [0, n) are exactly ranks 0 .. C(n, k) - 1, so one table serves every leaf size.
    """
    binom = np.zeros((_LEAF + 1, _LEAF + 2), dtype=np.int64)
    for n in range(_LEAF + 1):
        for k in range(n + 1):
            binom[n, k] = math.comb(n, k)
    masks = np.arange(1 << _LEAF, dtype=np.int64)
    rank = np.zeros(masks.size, dtype=np.int64)
    seen = np.zeros(masks.size, dtype=np.int64)
    for p in range(_LEAF):
        bit = (masks >> p) & 1
        rank += bit * binom[p, np.minimum(seen + 1, _LEAF + 1)]
        seen += bit
    unrank = []
    for k in range(_LEAF + 1):
        mk = masks[seen == k]
        unrank.append(mk[np.argsort(rank[mk])])
    return binom, rank, unrank


def _forest(ch: _Channel, n: np.ndarray, k: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """Code a k_r-subset of n_r slots for every root r; returns the chosen keys base_r + slot, sorted.

    ``truth`` (encoder only) is that same sorted key array. Each node halves its slot range and
    codes how many chosen slots fall in the left half (hypergeometric); a node with nothing or
    everything chosen ends. Shortcuts with the same probabilities, taken first at every level: one
    slot chosen (or one left out) is coded directly, uniformly, and so is a node of at most `_LEAF`
    slots, by its subset's rank among all C(n, k).
    """
    n = n.astype(np.int64)
    k = k.astype(np.int64)
    base = np.r_[0, np.cumsum(n)[:-1]].astype(np.int64) if n.size else np.zeros(0, np.int64)
    out = _Ranges()
    out.add(base[(k == n) & (n > 0)], n[(k == n) & (n > 0)])
    weight = np.minimum(k, n - k)
    live = np.flatnonzero(weight > 0)
    # Chunks of roots bound the nodes alive at once; a chunk is coded level by level.
    chunk_id = (np.cumsum(weight[live]) - 1) // _FOREST_CHUNK
    for cid in np.unique(chunk_id):
        roots = live[chunk_id == cid]
        start, size, kk = base[roots], n[roots], k[roots]
        while start.size:
            done = _forest_direct(ch, start, size, kk, truth, out)
            start, size, kk = start[~done], size[~done], kk[~done]
            start, size, kk = _forest_split(ch, start, size, kk, truth, out)
    return out.keys()


class _Ranges:
    """Runs of chosen keys collected while a forest is coded."""

    def __init__(self) -> None:
        self.starts: list[np.ndarray] = []
        self.lens: list[np.ndarray] = []

    def add(self, starts: np.ndarray, lens: np.ndarray) -> None:
        self.starts.append(starts)
        self.lens.append(lens)

    def keys(self) -> np.ndarray:
        starts = np.concatenate(self.starts)
        lens = np.concatenate(self.lens)
        offsets = np.repeat(starts - np.r_[0, np.cumsum(lens)[:-1]], lens)
        return np.sort(offsets + np.arange(int(lens.sum()), dtype=np.int64))


def _forest_direct(
    ch: _Channel, start: np.ndarray, size: np.ndarray, kk: np.ndarray, truth: np.ndarray | None, out: _Ranges
) -> np.ndarray:
    """Nodes coded in one uniform symbol: a single slot in or out, or a small node's whole subset."""
    single = kk == 1
    hole = ~single & (kk == size - 1)
    one = single | hole
    slot = None
    if truth is not None:
        s1, n1 = start[one], size[one]
        first = np.searchsorted(truth, s1)
        # A node missing one slot holds consecutive keys up to it: binary-search the first mismatch.
        lo, hi = np.zeros(s1.size, np.int64), np.where(single[one], 0, n1 - 1)
        while bool(np.any(lo < hi)):
            mid = (lo + hi) >> 1
            ok = truth[np.minimum(first + mid, truth.size - 1)] == s1 + mid
            lo, hi = np.where(ok & (lo < hi), mid + 1, lo), np.where(~ok & (lo < hi), mid, hi)
        slot = np.where(single[one], truth[np.minimum(first, truth.size - 1)] - s1, lo)
    at = _uniform(ch, size[one], slot)
    s1, n1, h1 = start[one], size[one], hole[one]
    out.add(np.where(h1, s1, s1 + at), np.where(h1, at, 1))
    out.add(s1 + at + 1, np.where(h1, n1 - at - 1, 0))
    leaf = ~one & (size <= _LEAF)
    binom, rank_of, unrank = _colex()
    sl, nl, kl = start[leaf], size[leaf], kk[leaf]
    rank = None if truth is None else np.zeros(0, np.int64)
    if truth is not None and sl.size:
        # The node's kl chosen keys sit consecutively in truth from its first one.
        at = np.repeat(np.searchsorted(truth, sl) - np.r_[0, np.cumsum(kl)[:-1]], kl) + np.arange(int(kl.sum()))
        bits = np.left_shift(1, truth[at] - np.repeat(sl, kl))
        rank = rank_of[np.bitwise_or.reduceat(bits, np.r_[0, np.cumsum(kl)[:-1]])]
    rank = _uniform(ch, binom[nl, kl], rank)
    masks = np.zeros(sl.size, dtype=np.int64)
    for kv in np.unique(kl):
        sel = kl == kv
        masks[sel] = unrank[kv][rank[sel]]
    rows, cols = np.nonzero((masks[:, None] >> np.arange(_LEAF)[None, :]) & 1)
    out.add(sl[rows] + cols, np.ones(rows.size, dtype=np.int64))
    return one | leaf


def _forest_split(
    ch: _Channel, start: np.ndarray, size: np.ndarray, kk: np.ndarray, truth: np.ndarray | None, out: _Ranges
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One hypergeometric split per node; the table covers the mean +- 6 sd, with escapes to the tails."""
    nl = size >> 1
    nr = size - nl
    lo = np.maximum(0, kk - nr)
    hi = np.minimum(kk, nl)
    f = np.float64
    var = (kk.astype(f) * nl.astype(f) * nr.astype(f) * (size - kk).astype(f)) / (
        size.astype(f) * size.astype(f) * (size - 1).astype(f)
    )
    reach = _reach(var, 6.0)
    center = (kk * nl) // size
    window = (np.maximum(lo, center - reach), np.minimum(hi, center + reach))
    kl = None if truth is None else np.searchsorted(truth, start + nl) - np.searchsorted(truth, start)
    params = {"k": kk, "nl": nl, "nr": nr, "mode": _hyper_mode(kk, nl, nr, lo, hi)}
    kl = _windowed(ch, _hyper_table, params, (lo, hi), window, kl)
    # Children interleaved, so every level's nodes stay in key order (sorted searches in the encoder).
    cs = np.stack([start, start + nl], axis=1).reshape(-1)
    cn = np.stack([nl, nr], axis=1).reshape(-1)
    ck = np.stack([kl, kk - kl], axis=1).reshape(-1)
    full = (ck == cn) & (cn > 0)
    out.add(cs[full], cn[full])
    go = (ck > 0) & (ck < cn)
    return cs[go], cn[go], ck[go]


# ---------------------------------------------------------------------------------------------- counts


def _code_counts(ch: _Channel, sizes: np.ndarray, count: int, kept: np.ndarray | None) -> np.ndarray:
    """Kept count per group: empty / full / partial types first, then the partial counts."""
    g = sizes.size
    if count == 0:
        return np.zeros(g, dtype=np.int64)
    if count == int(sizes.sum()):
        return sizes.copy()
    if g == 1:
        return np.array([count], dtype=np.int64)
    if kept is not None:
        partial = (kept > 0) & (kept < sizes)
        full = (kept == sizes) & (sizes > 0)
        g2, g1 = int(partial.sum()), int(full.sum())
    g2 = int(_uniform(ch, np.array([g + 1]), None if kept is None else np.array([g2]))[0])
    g1 = int(_uniform(ch, np.array([g - g2 + 1]), None if kept is None else np.array([g1]))[0])
    truth = None
    if kept is not None:
        rest = np.flatnonzero(~partial)
        truth = np.concatenate([np.flatnonzero(partial), g + np.flatnonzero(full[rest])])
    keys = _forest(ch, np.array([g, g - g2]), np.array([g2, g1]), truth)
    partial_ids = keys[keys < g]
    rest = np.setdiff1d(np.arange(g), partial_ids, assume_unique=True)
    full_ids = rest[keys[keys >= g] - g]
    out = np.zeros(g, dtype=np.int64)
    out[full_ids] = sizes[full_ids]
    psize = sizes[partial_ids]
    if bool(np.any(psize < 2)):
        raise PayloadError("joint section marks a one-image group as partially kept")
    out[partial_ids] = 1 + _uniform(ch, psize - 1, None if kept is None else kept[partial_ids] - 1)
    if int(out.sum()) != count:
        raise PayloadError(f"joint section's group counts add up to {int(out.sum())}, header says count={count}")
    return out


# ---------------------------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class _Prior:
    """The Dirichlet prior of every group's labels: what each class-tree split is a beta-binomial of.

    ``kind`` 0: symmetric, 1/D per class with D = 2**exponent (exponent 1..16; 1 is KT). ``kind`` 1:
    alpha times the classes' shares of all kept labels, alpha = 2**(exponent - 5), with the global
    histogram coded first; this lets the first label of a folder cost the global entropy rather than
    log2 C when a few classes dominate.
    """

    kind: int
    exponent: int
    cum: np.ndarray | None = None  # kind 1: cumulative global class counts, length C + 1

    def split(self, c0: np.ndarray, mid: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Integers (d, cl, cr) with beta-binomial parameters cl/d and cr/d for the split at ``mid``."""
        if self.kind == 0:
            return np.full(c0.size, 1 << self.exponent, dtype=np.int64), mid - c0, c1 - mid
        up, down = max(self.exponent - 5, 0), max(5 - self.exponent, 0)
        cum = self.cum
        d = np.full(c0.size, int(cum[-1]) << down, dtype=np.int64)
        return d, (cum[mid] - cum[c0]) << up, (cum[c1] - cum[mid]) << up


@dataclass
class _Level:
    """One level of the class tree: its nodes, each a run of items sharing group and class range.

    ``ml`` is how many of a node's m items go to its left child; leaves (one class) keep everything
    "left", and so does a single item under the symmetric prior, which jumps straight to its class.
    """

    group: np.ndarray
    c0: np.ndarray
    c1: np.ndarray
    m: np.ndarray
    ml: np.ndarray
    jump: np.ndarray

    @classmethod
    def roots(cls, kept: np.ndarray, n_classes: int) -> _Level:
        g = np.flatnonzero(kept > 0)
        m = kept[g]
        n = g.size
        return cls(g, np.zeros(n, np.int64), np.full(n, n_classes, np.int64), m, m.copy(), np.full(n, -1, np.int64))

    @property
    def mid(self) -> np.ndarray:
        return self.c0 + (self.c1 - self.c0) // 2

    @property
    def splits(self) -> np.ndarray:
        """Nodes whose items divide by class at ``mid`` (two or more classes, no jump)."""
        return (self.c1 - self.c0 >= 2) & (self.jump < 0)

    def children(self) -> _Level:
        """The next level, in (group, class) order; empty children are dropped."""
        jumped = self.jump >= 0
        l0 = np.where(jumped, self.jump, self.c0)
        l1 = np.where(jumped, self.jump + 1, np.where(self.splits, self.mid, self.c1))
        pair = lambda a, b: np.stack([a, b], axis=1).reshape(-1)  # noqa: E731
        g = np.repeat(self.group, 2)
        c0 = pair(l0, self.mid)
        c1 = pair(l1, self.c1)
        m = pair(self.ml, self.m - self.ml)
        keep = m > 0
        return _Level(g[keep], c0[keep], c1[keep], m[keep], m[keep].copy(), np.full(int(keep.sum()), -1, np.int64))


def _code_splits(ch: _Channel, lv: _Level, n_classes: int, prior: _Prior, keys: np.ndarray | None) -> None:
    """Fill in how every node of one class level splits its labels (``ml``, or ``jump`` for one item).

    ``keys`` (encoder only) are the items' group * C + label, sorted.
    """
    base = lv.group * n_classes
    if prior.kind == 0:
        # One item under a symmetric Dirichlet: its class is uniform over the node's classes.
        lone = np.flatnonzero((lv.c1 - lv.c0 >= 2) & (lv.m == 1))
        offset = None
        if keys is not None:
            offset = keys[np.searchsorted(keys, base[lone] + lv.c0[lone])] - base[lone] - lv.c0[lone]
        lv.jump[lone] = lv.c0[lone] + _uniform(ch, (lv.c1 - lv.c0)[lone], offset)
    node = np.flatnonzero(lv.splits)
    mid = lv.mid[node]
    d, cl, cr = prior.split(lv.c0[node], mid, lv.c1[node])
    m = lv.m[node]
    # A side no kept label falls in takes nothing; nothing to code.
    lv.ml[node] = np.where(cl == 0, 0, m)
    live = (cl > 0) & (cr > 0)
    node, mid, d, cl, cr, m = node[live], mid[live], d[live], cl[live], cr[live], m[live]
    params = {"m": m, "cl": cl, "cr": cr, "d": d, **_beta_binomial_shape(m, cl, cr, d)}
    ml = None
    if keys is not None:
        b = base[node]
        ml = np.searchsorted(keys, b + mid) - np.searchsorted(keys, b + lv.c0[node])
    # Variance of beta-binomial(m, a, b): m a b (a+b+m) / ((a+b)^2 (a+b+1)).
    f = np.float64
    a, b, t = cl.astype(f) / d, cr.astype(f) / d, (cl + cr).astype(f) / d
    var = m.astype(f) * a * b * (t + m.astype(f)) / (t * t * (t + 1.0))
    reach = _reach(var, 8.0)
    # Only log-concave rows (both parameters >= 1) have tails thin enough to window; the others keep
    # their whole support, and the rare one too wide for a table is coded uniformly.
    whole = (cl < d) | (cr < d)
    flat = whole & (m + 1 > 2 * _HALF_WINDOW)
    window = (
        np.where(whole, 0, np.maximum(0, params["mode"] - reach)),
        np.where(whole, m, np.minimum(m, params["mode"] + reach)),
    )
    coded = np.flatnonzero(~flat)
    out = np.zeros(node.size, dtype=np.int64)
    out[coded] = _windowed(
        ch,
        _beta_binomial_table,
        {key: val[coded] for key, val in params.items()},
        (np.zeros(coded.size, np.int64), m[coded]),
        (window[0][coded], window[1][coded]),
        None if ml is None else ml[coded],
    )
    out[flat] = _uniform(ch, m[flat] + 1, None if ml is None else ml[flat])
    lv.ml[node] = out


def _mixed(lv: _Level) -> np.ndarray:
    return lv.splits & (lv.ml > 0) & (lv.ml < lv.m)


def _partition(order: np.ndarray, lv: _Level, left: np.ndarray) -> np.ndarray:
    """Stable split of every node's run of items: those going left first, then the rest."""
    block_start = np.repeat(np.r_[0, np.cumsum(lv.m)[:-1]], lv.m)
    block_ml = np.repeat(lv.ml, lv.m)
    csum = np.cumsum(left) - left  # lefts strictly before each item
    left_rank = csum - csum[block_start]
    right_rank = np.arange(order.size) - block_start - left_rank
    new_pos = block_start + np.where(left, left_rank, block_ml + right_rank)
    out = np.empty_like(order)
    out[new_pos] = order
    return out


def _code_global_histogram(ch: _Channel, count: int, n_classes: int, exponent: int, labels: np.ndarray | None):
    """All kept labels' class counts, under a symmetric prior: the base of the kind-1 prior."""
    lv = _Level.roots(np.array([count]), n_classes)
    keys = None if labels is None else np.sort(labels)
    while bool(np.any(lv.c1 - lv.c0 >= 2)):
        _code_splits(ch, lv, n_classes, _Prior(0, exponent), keys)
        lv = lv.children()
    hist = np.zeros(n_classes, dtype=np.int64)
    hist[lv.c0] = lv.m
    return hist


def _code_labels(
    ch: _Channel, kept: np.ndarray, n_classes: int, group: np.ndarray | None, labels: np.ndarray | None
) -> np.ndarray:
    """Every kept image's label, items in group order; ``group`` and ``labels`` are the encoder's truth.

    The prior first, then one class level at a time: each node's histogram split (beta-binomial) and,
    for nodes that send some but not all items left, which ones (a subset forest). Only one level is
    ever held.
    """
    count = int(kept.sum())
    if count == 0 or n_classes == 1:
        return np.zeros(count, dtype=np.int64)
    choice = None if labels is None else _label_choice(kept, group, labels, n_classes)
    kind = int(_uniform(ch, np.array([2]), None if choice is None else np.array([choice["kind"]]))[0])
    e = 1 + int(_uniform(ch, np.array([16]), None if choice is None else np.array([choice["exponent"] - 1]))[0])
    prior = _Prior(0, e)
    if kind == 1:
        ge = 1 + int(_uniform(ch, np.array([16]), None if choice is None else np.array([choice["global"] - 1]))[0])
        hist = _code_global_histogram(ch, count, n_classes, ge, labels)
        prior = _Prior(1, e - 1, np.r_[0, np.cumsum(hist)])
    keys = None if labels is None else np.sort(group * n_classes + labels)
    lv = _Level.roots(kept, n_classes)
    order = np.arange(count)  # items in node order, position order within a node
    while bool(np.any(lv.c1 - lv.c0 >= 2)):
        _code_splits(ch, lv, n_classes, prior, keys)
        mixed = _mixed(lv)
        block_start = np.r_[0, np.cumsum(lv.m)[:-1]]
        item_block = np.repeat(np.arange(lv.m.size), lv.m)
        truth = None
        if labels is not None:
            left = ~lv.splits[item_block] | (labels[order] < lv.mid[item_block])
            root_base = np.full(lv.m.size, -1, dtype=np.int64)
            root_base[mixed] = np.r_[0, np.cumsum(lv.m[mixed])[:-1]]
            pick = np.flatnonzero(left & mixed[item_block])
            truth = root_base[item_block[pick]] + pick - block_start[item_block[pick]]
        chosen = _forest(ch, lv.m[mixed], lv.ml[mixed], truth)
        if labels is None:
            left = np.repeat(lv.ml == lv.m, lv.m)  # leaves, jumps and all-left nodes
            if chosen.size:
                rbase = np.r_[0, np.cumsum(lv.m[mixed])[:-1]]
                root = np.searchsorted(rbase, chosen, side="right") - 1
                left[block_start[np.flatnonzero(mixed)][root] + chosen - rbase[root]] = True
        order = _partition(order, lv, left)
        lv = lv.children()
    out = np.zeros(count, dtype=np.int64)
    out[order] = np.repeat(lv.c0, lv.m)
    return out


# ---------------------------------------------------------------------------------------------- costs


def _lgamma(x: np.ndarray) -> np.ndarray:
    """Vectorised log-gamma (Stirling after shifting x >= 8; ~1e-12 relative) for the encoder's choices."""
    x = np.asarray(x, dtype=np.float64)
    shift = np.zeros_like(x)
    y = x.copy()
    for _ in range(8):
        small = y < 8.0
        shift += np.where(small, np.log(np.where(small, y, 1.0)), 0.0)
        y = np.where(small, y + 1.0, y)
    inv = 1.0 / y
    inv2 = inv * inv
    series = inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))
    return (y - 0.5) * np.log(y) - y + 0.5 * math.log(2 * math.pi) + series - shift


def _sequence_bits(m: np.ndarray, total_alpha: np.ndarray, h: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """-log2 P(label sequences) under Dirichlet priors, one result per row of the prior arrays.

    Groups: m labels each, prior mass ``total_alpha`` (rows x groups); histogram entries: count h
    with prior ``alpha`` (rows x entries).
    """
    nats = (_lgamma(m + total_alpha) - _lgamma(total_alpha)).sum(axis=-1)
    nats -= (_lgamma(h + alpha) - _lgamma(alpha)).sum(axis=-1)
    return nats / math.log(2)


def _label_choice(kept: np.ndarray, group: np.ndarray, labels: np.ndarray, n_classes: int) -> dict:
    """The label prior with the shortest code, and that code's length in bits (encoder's choice)."""
    key, h = np.unique(group * n_classes + labels, return_counts=True)
    cls = key % n_classes
    m = kept[kept > 0].astype(np.float64)[None, :]
    hf = h.astype(np.float64)[None, :]
    exps = np.arange(1, PRIOR_EXPONENTS + 1)
    a = (2.0 ** -exps.astype(np.float64))[:, None]
    # Symmetric Dirichlet(2**-s): 1 bit for the kind, 4 for s.
    symmetric = _sequence_bits(m, n_classes * a, hf, a) + 5
    # Global shares: the histogram of all labels (its own symmetric exponent), then alpha * shares.
    gh = np.bincount(labels, minlength=n_classes).astype(np.float64)
    count = float(gh.sum())
    nz = gh[gh > 0][None, :]
    multinomial = (math.lgamma(count + 1) - float(_lgamma(nz + 1).sum())) / math.log(2)
    hist = _sequence_bits(np.array([[count]]), n_classes * a, nz, a) - multinomial
    alpha = 2.0 ** (exps.astype(np.float64) - 6)[:, None]
    shared = _sequence_bits(m, alpha, hf, alpha * gh[cls][None, :] / count) + 9 + float(hist.min())
    if float(shared.min()) < float(symmetric.min()):
        return {
            "kind": 1,
            "exponent": int(exps[np.argmin(shared)]),
            "global": int(exps[np.argmin(hist)]),
            "bits": float(shared.min()),
        }
    return {"kind": 0, "exponent": int(exps[np.argmin(symmetric)]), "global": 0, "bits": float(symmetric.min())}


def _position_bits(sizes: np.ndarray, kept: np.ndarray, count: int) -> tuple[float, float]:
    """Bits for (typed group counts + per-group subsets, one flat subset of the pool)."""
    n = int(sizes.sum())
    g = sizes.size
    positions = float((_lgamma(sizes + 1.0) - _lgamma(kept + 1.0) - _lgamma(sizes - kept + 1.0)).sum())
    typed = positions / math.log(2)
    if g > 1 and 0 < count < n:
        partial = (kept > 0) & (kept < sizes)
        g2, g1 = int(partial.sum()), int((kept == sizes).sum())
        typed += math.log2(g + 1) + math.log2(g - g2 + 1) + float(np.log2(sizes[partial] - 1.0).sum())
        typed += _log2_binom(np.array([g, g - g2]), np.array([g2, g1]))
    flat = (math.lgamma(n + 1) - math.lgamma(count + 1) - math.lgamma(n - count + 1)) / math.log(2)
    return typed, flat


def _log2_binom(n: np.ndarray, k: np.ndarray) -> float:
    lg = np.frompyfunc(math.lgamma, 1, 1)
    n = n.astype(np.float64)
    k = k.astype(np.float64)
    return float((lg(n + 1) - lg(k + 1) - lg(n - k + 1)).astype(np.float64).sum()) / math.log(2)


# ---------------------------------------------------------------------------------------------- api


def _check(
    indices: Any, labels: Any, pool_size: int, n_classes: int, groups: Any
) -> tuple[Grouping, np.ndarray, np.ndarray]:
    gr = grouping(groups, pool_size)
    if not isinstance(n_classes, (int, np.integer)) or not 1 <= n_classes <= MAX_CLASSES:
        raise PayloadError(f"n_classes {n_classes!r} out of range (1..{MAX_CLASSES})")
    idx = np.asarray(indices)
    lab = np.asarray(labels)
    if idx.ndim != 1 or lab.shape != idx.shape:
        raise PayloadError("indices and labels must be 1-D arrays of equal length")
    if idx.size > MAX_COUNT:
        raise PayloadError(f"{idx.size} kept images is more than the context codec's limit {MAX_COUNT}")
    if idx.size:
        if idx.dtype.kind not in "iu" or lab.dtype.kind not in "iu":
            raise PayloadError("indices and labels must be integers")
        if int(idx.min()) < 0 or int(idx.max()) >= pool_size:
            raise PayloadError(f"index out of range: indices must lie in [0, {pool_size})")
        if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
            raise PayloadError("indices not strictly increasing (must be sorted and unique)")
        if int(lab.min()) < 0 or int(lab.max()) >= n_classes:
            raise PayloadError(f"label out of range: labels must lie in [0, {n_classes})")
    return gr, idx.astype(np.int64), lab.astype(np.int64)


def _items(gr: Grouping, idx: np.ndarray, lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kept images in group order: grouped position, group, label."""
    pos = _grouped_positions(gr, idx)
    if gr.members is not None:
        order = np.argsort(pos, kind="stable")
        pos, lab = pos[order], lab[order]
    group = np.searchsorted(gr.starts, pos, side="right") - 1
    return pos, group, lab


def encode(indices: Any, labels: Any, pool_size: int, n_classes: int, groups: Any = None) -> bytes:
    """Range-coded bytes for a sorted selection and its labels (decode needs the same groups)."""
    gr, idx, lab = _check(indices, labels, pool_size, n_classes, groups)
    pos, group, lab = _items(gr, idx, lab)
    kept = np.bincount(group, minlength=gr.count).astype(np.int64)
    ch = _Encoder()
    _run(ch, gr, idx.size, n_classes, (pos, group, lab, kept))
    return ch.finish()


def decode(
    data: bytes, count: int, pool_size: int, n_classes: int, groups: Any = None
) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `encode`: sorted int64 indices and int64 labels; any defect is a PayloadError."""
    gr = grouping(groups, pool_size)
    if not isinstance(count, (int, np.integer)) or not 0 <= count <= min(pool_size, MAX_COUNT):
        raise PayloadError(f"count {count!r} out of range for the context codec")
    if not isinstance(n_classes, (int, np.integer)) or not 1 <= n_classes <= MAX_CLASSES:
        raise PayloadError(f"n_classes {n_classes!r} out of range (1..{MAX_CLASSES})")
    ch = _Decoder(bytes(data))
    pos, lab = _run(ch, gr, int(count), int(n_classes), None)
    ch.finish()
    idx = pos if gr.members is None else gr.members[pos]
    if gr.members is not None:
        order = np.argsort(idx)
        idx, lab = idx[order], lab[order]
    return idx, lab


def _run(
    ch: _Channel, gr: Grouping, count: int, n_classes: int, truth: tuple[np.ndarray, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """The whole stream, shared by encoder (truth given) and decoder so their order cannot drift.

    Order: how positions are coded (when there is a choice), the positions, then the labels. Per
    group (typed counts, then each partial group's subset) suits clustered selections; one subset
    of the whole pool costs log2 C(N, k), less than any per-group code when the selection ignores
    the folders.
    """
    sizes = gr.sizes
    n = gr.pool_size
    flat = False
    if sizes.size > 1 and 0 < count < n:
        choice = None
        if truth is not None:
            typed, whole = _position_bits(sizes, truth[3], count)
            choice = np.array([int(whole < typed)])
        flat = bool(_uniform(ch, np.array([2]), choice)[0])
    if flat:
        pos = _forest(ch, np.array([n]), np.array([count]), None if truth is None else truth[0])
        kept = np.bincount(np.searchsorted(gr.starts, pos, side="right") - 1, minlength=sizes.size)
        kept = kept.astype(np.int64)
    else:
        pos, kept = _code_grouped_positions(ch, gr, count, truth)
    if truth is not None:
        _code_labels(ch, kept, n_classes, truth[1], truth[2])
        return truth[0], truth[2]
    if pos.size != count:
        raise PayloadError(f"joint section decodes to {pos.size} images, header says count={count}")
    return pos, _code_labels(ch, kept, n_classes, None, None)


def _code_grouped_positions(
    ch: _Channel, gr: Grouping, count: int, truth: tuple[np.ndarray, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Typed group counts, then the kept slots of every partial group; grouped positions, sorted."""
    sizes = gr.sizes
    kept = _code_counts(ch, sizes, count, None if truth is None else truth[3])
    partial = np.flatnonzero((kept > 0) & (kept < sizes))
    pbase = np.r_[0, np.cumsum(sizes[partial])[:-1]].astype(np.int64)
    keys = None
    if truth is not None:
        pos, group = truth[0], truth[1]
        slot = np.full(sizes.size, -1, dtype=np.int64)
        slot[partial] = pbase
        in_partial = kept[group] < sizes[group]
        keys = slot[group[in_partial]] + pos[in_partial] - gr.starts[group[in_partial]]
    chosen = _forest(ch, sizes[partial], kept[partial], keys)
    if truth is not None:
        return truth[0], kept
    root = np.searchsorted(pbase, chosen, side="right") - 1
    from_partial = gr.starts[partial][root] + chosen - pbase[root]
    full = np.flatnonzero((kept == sizes) & (kept > 0))
    lens = sizes[full]
    from_full = np.repeat(gr.starts[full] - np.r_[0, np.cumsum(lens)[:-1]], lens) + np.arange(int(lens.sum()))
    return np.sort(np.concatenate([from_partial, from_full])), kept

