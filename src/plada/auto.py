"""Let the sender pick the selection policy: a byte budget (or a fixed keep size) in, the best selection out.

No policy wins everywhere (lowest energy collapses to one class on Fashion-MNIST, random beats it on
CIFAR-10, nearest-to-target wins one and loses the other), so the choice is made per target by
measurement rather than by hand: every candidate policy, at every keep size whose *real* encoded
payload fits the budget, is turned into a selection; a cheap proxy student (a linear head on frozen
features of the kept pool images, trained on the teacher's pseudo-labels) is scored on target images
the teacher never trained on, and that held-out accuracy is the forecast. The best forecast wins.

Everything here takes plain arrays, so the pipeline, the benchmarks and the tests share one search:

- ``labels``, ``energy``, ``entropy``: the teacher's per-pool-image scores (``score.Scores``).
- ``pool_feats``: frozen backbone features of every pool image (``features.cached_features``).
- ``heldout_feats``/``heldout_labels``: target train images the teacher did not see, with true labels.
- ``size_of(indices, labels, forecast) -> bytes``: the exact payload size (see ``payload_sizer``). The
  search passes the forecast the header will carry, so the budget holds for the file written.

Choice rule: highest forecast; ties go to more kept images (a tie is no evidence either way, and a
bigger labelled set is the better prior: on Flowers-5 at 20 KB the tie went to half the images and cost
2 points of test accuracy), then to fewer bytes, then to the earlier candidate. One guard on
top: if a candidate keeping every class the teacher ever predicts is within ``margin`` of the best,
it is chosen instead, because a class missing from the payload can never be learnt by the receiver
while a small held-out set easily misses a rare class.

Every candidate is one teacher's own selection (`Decider`), forecast on target images that teacher never
saw, and what is sent is the very selection forecast. A sending teacher that left part of train unseen
(``teacher.limit``) is the one decider; one that would see all of train is replaced by `DECIDERS`
teachers, each fitted without its own slice, and the payload carries the winning teacher's labels
(single teachers differ on one rule by about as much as rules differ, so only a teacher's own selection
is forecast honestly by its own held-out images: benchmarks/HISTORY.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import payload, rate, select
from .errors import PladaError
from .train import head_job, train_heads

NEAREST = "nearest-target"
# The proxy trains exactly as the benchmark's linear student does (1000 steps). With 300 steps it ranked
# candidates differently from the student it forecasts: on Fashion-MNIST at 20 KB, 5,000 unseen held-out
# images, it put a Safety-Net selection 1.8 points above one that scored 3.3 points better on test.
PROXY_STEPS = 1000
WHOLE_GROUPS = "whole-groups"  # plada.rate: whole pool folders, minority labels moved to the majority below tau
# Share of train each deciding teacher does not see: its forecast's sample against its labels' quality. Chosen on
# validation rows (V, the test split unread; docs/RESULTS.md): on Flowers-5, 20% against 10% gave the chosen payload
# 52.5 / 59.4 / 61.5% against 51.2 / 55.2 / 59.7% on V at 1 / 5 / 20 KB, the mean of two search seeds (seed 0
# +4.0 / +6.0 / +4.7 points, seed 1 even at -1.4 / +2.4 / -1.3; 549 against 274 held-out images per decider).
# GTSRB, whose groups are 5 near-duplicate frames of one sign track, already held out 20%.
HOLDOUT_FRACTION = 0.2
# Deciding teachers `plada send --budget` fine-tunes when its teacher used all of train, each without its own
# disjoint slice (above) and each forecasting its own selections on that slice only; the best forecast is sent.
# Why two: a single decider's misses were mostly its own fine-tune's luck, not the forecast's choice
# (scripts/gap_decomposition.py); with two, GTSRB was within 1 point of the hindsight best in 9 of 9 cells over
# three seeds (one: 6 of 9), Flowers-5 in 5 of 6 either way; the cost is one more teacher fine-tune. On validation
# rows (benchmarks.auto_defaults) either decider alone lost 0.8-0.9 points on average over 6 cells, never won.
DECIDERS = 2

FORECAST_DIGITS = payload.FORECAST_DIGITS
# Widest value ``round(x, FORECAST_DIGITS)`` can print as for x in [0, 1]; used while sizing, before the
# forecast is known. The header is zstd-compressed, so the real forecast's
# digits can still make it a byte longer (measured: -3..+1 bytes over 1,600 forecasts on auto headers);
# sizing keeps FORECAST_SLACK bytes free for that, and the chosen payload is re-measured with its forecast.
_FORECAST_PLACEHOLDER = 0.1234
FORECAST_SLACK = 2

SizeFn = Callable[..., int]  # (indices, labels, forecast, receiver=None) -> exact payload bytes
# (mode, pool rows, their labels) -> the receiver's training set under that mode (`plada.receiver.expand`)
ExpandFn = Callable[[str, np.ndarray, np.ndarray], Any]


@dataclass(frozen=True)
class Policy:
    """A selection rule without a size: a rank key plus optional Safety-Net share and exponent.

    ``whole-groups`` instead keeps whole pool folders by mean energy (plada.rate), relabelling minority
    labels below confidence ``tau``; its size k is an upper bound (the largest folder prefix within k).
    """

    policy: str
    safety_share: float = 0.0
    alpha: float = 0.5
    tau: float | None = None

    @property
    def name(self) -> str:
        if self.policy == WHOLE_GROUPS:
            return f"{WHOLE_GROUPS} tau={self.tau:g}"
        if self.safety_share == 0:
            return self.policy
        base = "" if self.policy == "lowest-energy" else f"{self.policy} "
        return f"safety-net {base}s={self.safety_share:g} a={self.alpha:g}"


DEFAULT_POLICIES: tuple[Policy, ...] = (
    Policy("lowest-energy"),
    Policy("highest-energy"),
    Policy("lowest-entropy"),
    Policy("random"),
    Policy(NEAREST),
    Policy("lowest-energy", 0.1, 0.5),
    Policy("lowest-energy", 0.3, 0.5),
    Policy("lowest-energy", 0.1, -0.2),
    Policy("lowest-energy", 0.3, -0.2),
    Policy(WHOLE_GROUPS, tau=0.0),
    Policy(WHOLE_GROUPS, tau=1.0),
)
# Keep sizes tried per policy: these shares of the largest that fits the budget. When a budget holds most of the
# pool, fewer images can teach more: Fashion-MNIST at 20 KB fits 120,000 Safety-Net images, and 15,000 (1/8) scored
# 54.6% against 51.8% for 30,000 (1/4); adding 1/8 changed no other cell of `python -m benchmarks.auto_policy` (it
# was not chosen elsewhere) and cost 10-20% more search time (docs/AUTO_POLICY.md, discussion). Checked on validation
# rows carved from train (benchmarks.auto_defaults, 12 cells): every shorter ladder was worse in 1-2 cells, none better.
DEFAULT_FRACTIONS = (1.0, 0.5, 0.25, 0.125)


@dataclass
class AutoChoice:
    """The search's decision, and the whole table behind it so a report can show what was compared."""

    name: str
    policy: str
    safety_share: float
    alpha: float
    k: int
    forecast: float  # held-out accuracy of the proxy student, in [0, 1]
    payload_bytes: int  # exact size of the payload carrying this forecast
    budget_bytes: int | None
    seed: int
    heldout_images: int
    head_steps: int
    indices: np.ndarray = field(repr=False)  # sorted pool indices to keep
    labels: np.ndarray = field(repr=False)  # their pseudo-labels
    candidates: list[dict] = field(repr=False, default_factory=list)
    tau: float | None = None
    decider: int | None = None  # index of the deciding teacher whose selection and labels these are

    @property
    def rule(self) -> Policy:
        return Policy(self.policy, self.safety_share, self.alpha, self.tau)

    fold: int | None = None  # the deciding teacher's slice: None when the sending teacher decided itself
    receiver: str = "plain"  # the receiver mode the forecast assumed: the payload header names it

    def summary(self) -> dict:
        """JSON-ready report (no arrays): what the CLI prints and the benchmarks store."""
        return {"name": self.name, "policy": self.policy, "safety_share": self.safety_share, "alpha": self.alpha,
                "tau": self.tau,
                "k": self.k, "forecast": self.forecast, "payload_bytes": self.payload_bytes,
                "budget_bytes": self.budget_bytes, "seed": self.seed, "heldout_images": self.heldout_images,
                "head_steps": self.head_steps, "decider": self.fold, "receiver": self.receiver,
                "candidates": self.candidates}


@dataclass(frozen=True)
class Decider:
    """A teacher that did not see some held-out images: its pool scores, and which held-out rows are its own.

    Its candidates are its own selections, sized with its own labels and forecast on its own rows only.
    ``fold`` names it in the send report (``auto.decider``); None for a sending teacher that
    decides itself (it trained on a subset of train and the rest is its held-out set).
    """

    labels: np.ndarray
    energy: np.ndarray
    entropy: np.ndarray | None
    rows: np.ndarray  # indices into the search's heldout_feats / heldout_labels
    confidence: np.ndarray | None = None
    nearest_key: np.ndarray | None = None  # from target images this teacher trained on (never its held-out)
    test_accuracy: float | None = None  # of this teacher, where measured (a sender sending its labels reports it)
    fold: int | None = None
    train_seconds: float | None = None  # its fine-tune, for reports


def payload_sizer(
    pool_fingerprint: str, pool_size: int, class_names: Sequence[str], receiver: str = "plain",
    **encode_kwargs: Any,
) -> SizeFn:
    """Size candidates by encoding the very payload that would be written: header, codecs and checksum included.

    ``receiver`` and ``encode_kwargs`` (e.g. ``groups=pool.groups()[0]``, ``level``) must be exactly what
    the caller will write with, or the measured sizes would not be the file's.
    """
    names, default = tuple(class_names), receiver

    def size_of(indices: np.ndarray, labels: np.ndarray, forecast: float | None, receiver: str | None = None) -> int:
        p = payload.Payload(pool_fingerprint, pool_size, names, indices, labels, forecast=forecast,
                            receiver=default if receiver is None else receiver)
        size_of.last = payload.encode(p, **encode_kwargs)  # type: ignore[attr-defined]
        return len(size_of.last)  # type: ignore[attr-defined]

    size_of.last = b""  # type: ignore[attr-defined]  # the bytes of the latest call: search's last is its choice
    return size_of


def nearest_target_key(pool_feats: np.ndarray, target_feats: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Rank key for "keep the pool images most like some target image": minus the max cosine similarity.

    Max (not mean) similarity so every target mode pulls in its own neighbours. Chunked over the pool so
    120k x 5k similarities never exist at once (a chunk is ``chunk x len(target_feats)`` float32);
    ``pool_feats`` may be a memory map. Pass a subsample of the target's *training* images: using the
    held-out images would leak them into the forecast.
    """
    t = np.asarray(target_feats, dtype=np.float32)
    if t.ndim != 2 or len(t) == 0:
        raise PladaError("nearest-target needs a non-empty 2-D array of target features")
    if pool_feats.ndim != 2 or pool_feats.shape[1] != t.shape[1]:
        raise PladaError(f"pool features {pool_feats.shape} and target features {t.shape} differ in width")
    if not np.isfinite(t).all():
        raise PladaError("target features contain NaN or inf")
    t = t / (np.linalg.norm(t, axis=1, keepdims=True) + 1e-12)
    key = np.empty(len(pool_feats), dtype=np.float64)
    for a in range(0, len(pool_feats), chunk):
        f = np.asarray(pool_feats[a : a + chunk], dtype=np.float32)
        f = f / (np.linalg.norm(f, axis=1, keepdims=True) + 1e-12)
        key[a : a + len(f)] = -(f @ t.T).max(1)
    if np.isnan(key).any():
        raise PladaError("pool features contain NaN; recompute the feature cache")
    return key


def holdout_split(n: int, frac: float, seed: int = 0, limit: int | None = 5000) -> tuple[np.ndarray, np.ndarray]:
    """Split target train indices into (teacher, held-out): the forecast is only honest on unseen images.

    Held-out is a seeded ``frac`` of the split, capped at ``limit`` (more buys little precision and
    costs feature time), and at least one image; both parts come back sorted.
    """
    if n < 2:
        raise PladaError(f"need at least 2 target train images to hold some out, got {n}")
    if not 0 < frac < 1:
        raise PladaError(f"held-out fraction must be in (0, 1), got {frac}")
    m = max(1, int(round(frac * n)))
    if limit is not None:
        m = max(1, min(m, int(limit)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[m:]), np.sort(perm[:m])


def subsample(idx: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` of ``idx``, a seeded sorted sample: more held-out or reference images buy little."""
    return idx if len(idx) <= limit else np.sort(np.random.default_rng(seed).permutation(idx)[:limit])


def name_groups(files: Sequence[str], pattern: str) -> np.ndarray:
    """Group id per target train image from its file name: images sharing a group are held out together.

    Why: frames of one physical object (GTSRB keeps 5 frames of each sign's track, named TRACK_FRAME.png)
    split across fit and held-out rows let the deciding teacher see the held-out object, while the test
    split holds other objects; grouped folds make held-out images as new to the teacher as test images
    are. The group is the class folder plus ``pattern``'s first capture group (else its whole match)
    searched in the file's base name; a name it does not match is a group of its own.
    """
    import re

    try:
        rx = re.compile(pattern)
    except (re.error, TypeError) as e:
        raise PladaError(f"held-out group pattern {pattern!r} is not a valid regular expression: {e}") from None
    keys = []
    for i, f in enumerate(files):
        cls, _, base = str(f).rpartition("/")
        m = rx.search(base)
        keys.append(f"{cls}\0{m.group(1) if m and rx.groups else m.group(0)}" if m else f"\1{i}")
    _, ids = np.unique(np.asarray(keys, dtype=object), return_inverse=True)
    return ids.astype(np.int64).reshape(-1)


def decider_plan(deciders: int | None = None, frac: float | None = None) -> tuple[int, float]:
    """(deciding teachers, held-out slice each) from what a user asked for: `DECIDERS` and
    `HOLDOUT_FRACTION` where not given. Checked before any teacher trains."""
    if deciders is not None and (not isinstance(deciders, int | np.integer) or isinstance(deciders, bool)
                                 or deciders < 1):
        raise PladaError(f"deciders must be a positive integer, got {deciders!r}")
    n = int(DECIDERS if deciders is None else deciders)
    frac = HOLDOUT_FRACTION if frac is None else frac
    check_slices(n, frac)
    return n, frac


def check_slices(folds: int, frac: float) -> None:
    """Refuse ``folds`` disjoint held-out slices of ``frac`` that leave nothing to fit on (`fold_split`'s rule,
    callable before any teacher trains)."""
    if not 0 < frac < 1:
        raise PladaError(f"held-out fraction must be in (0, 1), got {frac!r}")
    if folds * frac >= 1:
        raise PladaError(f"{folds} held-out slices of {frac:g} of train each leave no train image to fit on")


def fold_split(n: int, folds: int, seed: int = 0, groups: np.ndarray | None = None, frac: float | None = None
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(fit, held-out) index pairs, one per deciding teacher: seeded, disjoint held-out slices.

    Each of ``folds`` teachers goes without its own slice of ``frac`` of the images (default
    `HOLDOUT_FRACTION`), the slices following one another in one seeded
    order, so the first slice is the ``folds=1`` slice and the rest of train is never held out. Why several
    slices: teachers fitted on different images differ in what their selections teach by as much as rules
    differ, and only a teacher's own held-out images can say which is better. With ``groups`` (one id per
    image, see `name_groups`) whole groups go to one side: groups in seeded order until each slice's end
    reaches its multiple of ``frac`` of the images.
    """
    if not isinstance(folds, int | np.integer) or folds < 1:
        raise PladaError(f"deciding teachers must be a positive integer, got {folds!r}")
    if frac is None:
        frac = HOLDOUT_FRACTION
    check_slices(folds, frac)
    if groups is None:
        fit0, held0 = holdout_split(n, frac, seed)
        if folds == 1:
            return [(fit0, held0)]
        m = len(held0)  # holdout_split's slice size, so slice 0 is its slice
        if folds * m >= n:
            raise PladaError(f"need more than {folds * m} target train images for {folds} slices of {m}")
        perm = np.random.default_rng(seed).permutation(n)
        return [(np.sort(np.concatenate([perm[:j * m], perm[(j + 1) * m:]])), np.sort(perm[j * m:(j + 1) * m]))
                for j in range(folds)]
    g = np.asarray(groups)
    if g.shape != (n,) or g.dtype.kind not in "iu":
        raise PladaError(f"need one integer group id per target train image ({n}), got shape {g.shape}")
    uniq, inv, counts = np.unique(g, return_inverse=True, return_counts=True)
    if len(uniq) < folds + 1:
        raise PladaError(f"need at least {folds + 1} groups for {folds} held-out slice(s), the train split has "
                         f"{len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    cum = np.cumsum(counts[order])  # slice j: the next groups in seeded order, until (j + 1) * frac of the images
    ends = [min(int(np.searchsorted(cum, max(1, round((j + 1) * frac * n)))) + 1, len(uniq) - 1)
            for j in range(folds)]
    starts = [0, *ends[:-1]]
    if any(e <= s for s, e in zip(starts, ends, strict=True)):
        raise PladaError(f"{folds} held-out slices of {frac:g} of train need more groups than the "
                         f"{len(uniq)} the train split has")
    pos = np.empty(len(uniq), dtype=np.int64)
    pos[order] = np.arange(len(uniq))
    at = pos[inv.reshape(-1)]
    return [(np.flatnonzero((at < s) | (at >= e)), np.flatnonzero((at >= s) & (at < e)))
            for s, e in zip(starts, ends, strict=True)]


def policy_key(pol: Policy | str, energy: np.ndarray, entropy: np.ndarray | None = None, seed: int = 0,
               nearest_key: np.ndarray | None = None) -> np.ndarray:
    """`select.rank_key` plus the nearest-target policy, so callers re-selecting a choice need one call."""
    name = pol.policy if isinstance(pol, Policy) else pol
    if name == NEAREST:
        if nearest_key is None:
            raise PladaError("policy 'nearest-target' needs target features (see nearest_target_key)")
        key = np.asarray(nearest_key, dtype=np.float64)
        if key.shape != np.shape(energy):
            raise PladaError(f"nearest-target key has {key.shape} entries, the pool {np.shape(energy)}")
        return key
    return select.rank_key(name, energy, entropy, seed=seed)


def selector(
    pol: Policy, *, labels: np.ndarray, energy: np.ndarray, entropy: np.ndarray | None, n_classes: int,
    seed: int = 0, nearest_key: np.ndarray | None = None, groups: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
) -> Callable[[int], rate.Selection]:
    """``k -> selection`` (kept indices and the labels to send) for one policy, shared by search and rebuilds.

    ``whole-groups`` needs the pool's folder per image (``groups``) and the teacher's confidence per
    image (``rate.confidence``); every other policy sends the teacher's own labels.
    """
    lab = np.asarray(labels).astype(np.int64, copy=False)
    if pol.policy == WHOLE_GROUPS:
        if groups is None or confidence is None:
            raise PladaError("policy 'whole-groups' needs the pool's groups and the teacher's confidences")
        tau = float(pol.tau if pol.tau is not None else 0.0)
        return lambda kk: rate.whole_groups_upto(lab, energy, groups, confidence, int(kk), n_classes, tau)
    key = policy_key(pol, energy, entropy, seed=seed, nearest_key=nearest_key)

    def pick(kk: int) -> rate.Selection:
        idx = select.select(lab, key, int(kk), n_classes, safety_share=pol.safety_share, alpha=pol.alpha)
        return rate.Selection(idx, lab[idx])

    return pick


def _largest_fitting(measure: Callable[[int], int | None], hi_cap: int) -> int | None:
    """Largest k in [1, hi_cap] found to fit, by doubling then bisection; None if k = 1 does not fit.

    Payload bytes grow with k almost monotonically (zstd can wobble by a byte or two), so this may miss
    a slightly larger k, but it only ever returns a k it measured as fitting: the budget is never at
    the mercy of monotonicity.
    """
    if measure(1) is None:
        return None
    lo, hi = 1, None  # lo: measured fit; hi: measured misfit (or beyond the cap)
    k = 2
    while k <= hi_cap:
        if measure(k) is None:
            hi = k
            break
        lo, k = k, 2 * k
    if hi is None:
        if lo == hi_cap or measure(hi_cap) is not None:
            return hi_cap
        hi = hi_cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if measure(mid) is None:
            hi = mid
        else:
            lo = mid
    return lo


@dataclass(frozen=True)
class Planned:
    """One candidate of a search: a rule at one keep size, the selection it makes and its exact payload bytes."""

    policy: Policy
    k: int
    selection: rate.Selection
    bytes: int
    decider: int = 0  # whose selection: index into the search's deciders
    fold: int | None = None  # that decider's `Decider.fold` (None: the sending teacher itself)

    @property
    def name(self) -> str:
        return self.policy.name if self.fold is None else f"{self.policy.name} [fold {self.fold}]"

    def row(self, n_classes: int) -> dict:
        """Its row in a search's table, before any forecast (the search adds its forecast, a benchmark its test)."""
        kept = np.bincount(self.selection.labels, minlength=n_classes) > 0
        return {"name": self.name, "policy": self.policy.policy, "safety_share": self.policy.safety_share,
                "alpha": self.policy.alpha, "tau": self.policy.tau, "decider": self.fold, "k": int(self.k),
                "kept": int(len(self.selection.indices)), "bytes": self.bytes, "classes_kept": int(kept.sum())}


def plan_candidates(
    policies: Sequence[Policy], *, labels: np.ndarray, energy: np.ndarray, entropy: np.ndarray | None,
    n_classes: int, size_of: SizeFn, budget_bytes: int | None = None,
    k: int | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS, nearest_key: np.ndarray | None = None,
    groups: np.ndarray | None = None, confidence: np.ndarray | None = None, seed: int = 0,
    max_k: int | None = None, decider: int = 0, fold: int | None = None, log: Callable[[str], None] | None = None,
) -> list[Planned]:
    """Per policy, the keep sizes whose real payload fits: the largest (by doubling and bisection) times ``fractions``.

    One teacher's scores in, so a search sizes either the sending teacher's selections or each deciding
    teacher's own (their labels code differently), and a benchmark can rebuild a search's table without
    forecasting it. Sizes are measured with a placeholder forecast of maximal width and must fit
    ``budget_bytes - FORECAST_SLACK``. Policies whose inputs are missing (nearest key, entropy, groups,
    confidences) are skipped.
    """
    say = log or (lambda s: None)
    room = None if budget_bytes is None else budget_bytes - FORECAST_SLACK
    lab = np.asarray(labels).astype(np.int64, copy=False)
    n = len(lab)
    hi_cap = n if max_k is None else max(1, min(n, int(max_k)))
    planned: list[Planned] = []
    for pol in policies:
        if not _has_inputs(pol, nearest_key, entropy, groups, confidence):
            continue
        make = selector(pol, labels=lab, energy=energy, entropy=entropy, n_classes=n_classes, seed=seed,
                        nearest_key=nearest_key, groups=groups, confidence=confidence)
        sel: dict[int, tuple[rate.Selection, int]] = {}

        def pick(kk: int, pol: Policy = pol, make=make, sel: dict = sel) -> rate.Selection:
            if kk not in sel:
                got = make(kk)
                sel[kk] = (got, int(size_of(got.indices, got.labels, _FORECAST_PLACEHOLDER)))
            return sel[kk][0]

        if budget_bytes is None:
            sizes = [int(k)]
        else:
            def measure(kk: int, pick=pick, sel: dict = sel) -> int | None:
                pick(kk)
                return sel[kk][1] if sel[kk][1] <= room else None

            top = _largest_fitting(measure, hi_cap)
            if top is None:
                say(f"auto: {pol.name}: not even 1 image fits in {budget_bytes} bytes")
                continue
            sizes = sorted({max(1, int(top * f)) for f in fractions} | {top}, reverse=True)
        for kk in sizes:
            got = pick(kk)
            nbytes = sel[kk][1]
            if room is not None and nbytes > room:
                continue  # a smaller k that is bigger on disk: possible in principle, never sent
            if len(got.indices) == 0:
                continue  # no whole folder fits in kk images
            if any(c.policy == pol and len(c.selection.indices) == len(got.indices) for c in planned):
                continue  # the same folders as a bigger kk (a policy's selections are nested)
            planned.append(Planned(pol, kk, got, nbytes, decider, fold))
    return planned


def _has_inputs(pol: Policy, nearest_key, entropy, groups, confidence) -> bool:
    """Whether one teacher's scores hold what `pol` ranks by."""
    return not ((pol.policy == NEAREST and nearest_key is None) or (pol.policy == "lowest-entropy" and entropy is None)
                or (pol.policy == WHOLE_GROUPS and (groups is None or confidence is None)))


def _check_inputs(labels, energy, entropy, pool_feats, heldout_feats, heldout_labels, n_classes) -> np.ndarray:
    if not isinstance(n_classes, int | np.integer) or n_classes < 1:
        raise PladaError(f"n_classes must be a positive integer, got {n_classes!r}")
    lab = np.asarray(labels)
    n = len(lab)
    if lab.ndim != 1 or lab.dtype.kind not in "iu" or n == 0:
        raise PladaError("pool pseudo-labels must be a non-empty 1-D integer array")
    if np.shape(energy) != (n,) or (entropy is not None and np.shape(entropy) != (n,)):
        raise PladaError(f"energy/entropy must have one value per pool image ({n})")
    if pool_feats.ndim != 2 or len(pool_feats) != n:
        raise PladaError(f"pool features have {len(pool_feats)} rows, the pool has {n} images")
    if heldout_feats.ndim != 2 or heldout_feats.shape[1] != pool_feats.shape[1]:
        raise PladaError(f"held-out features {heldout_feats.shape} do not match pool features {pool_feats.shape}")
    hl = np.asarray(heldout_labels)
    if len(hl) == 0 or len(hl) != len(heldout_feats):
        raise PladaError(f"need one true label per held-out image and at least one image, got {len(hl)} labels "
                         f"for {len(heldout_feats)} images")
    if lab.min() < 0 or lab.max() >= n_classes or hl.min() < 0 or hl.max() >= n_classes:
        raise PladaError(f"labels must lie in [0, {n_classes})")
    return lab.astype(np.int64, copy=False)


def search(
    *,
    deciders: Sequence[Decider],
    pool_feats: np.ndarray,
    heldout_feats: np.ndarray,
    heldout_labels: np.ndarray,
    n_classes: int,
    size_of: SizeFn,
    budget_bytes: int | None = None,
    k: int | None = None,
    groups: np.ndarray | None = None,
    policies: Sequence[Policy] = DEFAULT_POLICIES,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    head_steps: int = PROXY_STEPS,
    seed: int = 0,
    margin: float = 0.01,
    finalist_band: float = 0.02,
    finalist_seeds: int = 3,
    max_k: int | None = None,
    log: Callable[[str], None] | None = None,
    workers: int | None = None,
    receivers: Sequence[str] = ("plain",),
    expand: ExpandFn | None = None,
) -> AutoChoice:
    """Every decider's own selection, per policy and affordable keep size; returns the best forecast.

    Give exactly one of ``budget_bytes`` (sizes: the largest k that fits, times each of ``fractions``) or
    ``k`` (one size; only the policy varies). A policy is tried for a decider whose scores hold its inputs
    (nearest key, entropy, confidences; ``groups`` for whole-groups). Each candidate is sized with its
    decider's labels and forecast by a proxy head scored on that decider's own held-out rows. Deterministic
    given ``seed``: it seeds the random policy and every proxy head (the same seed for all, so candidates differ only by
    data); finalists (within ``finalist_band`` of the best) are re-forecast over ``finalist_seeds`` proxy
    seeds. ``workers``: proxy heads trained at once (default: one per CPU core); it changes no forecast.
    ``receivers``: the receiver modes a finalist is also forecast under, the proxy training on what
    ``expand(mode, rows, labels)`` makes of it (the receiver's own pool labelling, simulated exactly: same
    pool, same public features); the chosen row names its mode. With plain among them (the sender's
    default), a mode that would make a target worse (far out of distribution) is not sent.
    """
    deciders = list(deciders)
    heldout_feats = np.asarray(heldout_feats, dtype=np.float32)
    heldout_labels = np.asarray(heldout_labels)
    labs = _check_search(deciders, pool_feats, heldout_feats, heldout_labels, n_classes, budget_bytes, k, policies,
                         finalist_seeds, finalist_band, fractions)
    say = log or (lambda s: None)
    parts = [np.asarray(d.rows) for d in deciders]
    modes = _receiver_modes(receivers, expand)

    # 1. Sizes: per decider and policy, the keep sizes whose real payload fits.
    planned = _plan(deciders, labs, policies, n_classes=n_classes, size_of=size_of, budget_bytes=budget_bytes, k=k,
                    fractions=fractions, groups=groups, seed=seed, max_k=max_k, say=say)

    # 2. Forecast: a proxy head per distinct selection, scored on its decider's held-out rows.
    fc = _Forecaster(planned, parts, pool_feats, heldout_feats, heldout_labels, n_classes, head_steps, workers,
                     expand)
    rows = _forecast_field(fc, planned, labs, n_classes, seed, say)

    # 2b-c. Finalists (near the best) re-forecast over several proxy seeds and under each receiver mode.
    finalists, of = _reforecast_finalists(fc, rows, modes, seed, finalist_band, finalist_seeds, say)

    # 3. Choose among finalists; the real forecast moves the compressed header by a byte or so: re-measure.
    r, nbytes = _choose(rows, finalists, of, planned, modes, margin, size_of, budget_bytes)
    c, mode = planned[of[r]], rows[r]["receiver"]
    idx, sent = c.selection
    pol = c.policy
    return AutoChoice(
        name=pol.name, policy=pol.policy, safety_share=pol.safety_share, alpha=pol.alpha, k=int(c.k),
        forecast=rows[r]["forecast"], payload_bytes=nbytes, budget_bytes=budget_bytes, seed=seed,
        heldout_images=len(parts[c.decider]), head_steps=head_steps, indices=idx, labels=sent.copy(),
        candidates=rows, tau=pol.tau, decider=c.decider, fold=c.fold, receiver=mode,
    )


def _receiver_modes(receivers: Sequence[str], expand: ExpandFn | None) -> list[str]:
    """The distinct receiver modes to forecast, in order; refused early, as anything but plain needs ``expand``."""
    modes = list(dict.fromkeys(receivers))
    if not modes:
        raise PladaError("no receiver mode to forecast for")
    if modes != ["plain"] and expand is None:
        raise PladaError("forecasting receiver modes other than plain needs their expand function")
    return modes


def _plan(deciders: list[Decider], labs: list[np.ndarray], policies: Sequence[Policy], *, n_classes: int,
          size_of: SizeFn, budget_bytes: int | None, k: int | None, fractions: Sequence[float],
          groups: np.ndarray | None, seed: int, max_k: int | None, say: Callable[[str], None]) -> list[Planned]:
    """Every decider's candidates, sized with its own labels (they code differently); refused if none fits."""
    planned: list[Planned] = []
    for j, d in enumerate(deciders):
        planned += plan_candidates(policies, labels=labs[j], energy=d.energy, entropy=d.entropy, n_classes=n_classes,
                                   size_of=size_of,
                                   budget_bytes=budget_bytes, k=k, fractions=fractions, nearest_key=d.nearest_key,
                                   groups=groups, confidence=d.confidence, seed=seed, max_k=max_k, decider=j,
                                   fold=d.fold, log=say)
    if not planned:
        smallest = int(size_of(np.array([0]), labs[0][:1], _FORECAST_PLACEHOLDER))
        raise PladaError(f"byte budget {budget_bytes} is too small: even a payload keeping one image needs about "
                         f"{smallest} bytes (its header alone holds the pool fingerprint and class names)")
    return planned


def _forecast_field(fc: _Forecaster, planned: list[Planned], labs: list[np.ndarray], n_classes: int, seed: int,
                    say: Callable[[str], None]) -> list[dict]:
    """One row per candidate with a single-seed plain forecast: cheap enough for the whole field, enough to rank it."""
    first = fc([(i, seed, "plain") for i in range(len(planned))])
    predicted = [np.bincount(lab, minlength=n_classes) > 0 for lab in labs]
    rows: list[dict] = []
    for i, c in enumerate(planned):
        kept = np.bincount(c.selection.labels, minlength=n_classes) > 0
        rows.append({**c.row(n_classes), "receiver": "plain", "forecast": first[i], "forecast_seeds": 1,
                     "covers_predicted": bool(kept[predicted[c.decider]].all())})
        say(f"auto: {c.name} k={c.k} ({c.bytes} B): forecast {rows[-1]['forecast']:.4f}")
    return rows


def _reforecast_finalists(fc: _Forecaster, rows: list[dict], modes: list[str], seed: int, finalist_band: float,
                          finalist_seeds: int, say: Callable[[str], None]) -> tuple[list[int], list[int]]:
    """Re-forecast the leaders over several seeds and per receiver mode, as one seed's noise spans their gaps.

    Adds a row per (finalist, mode other than plain) to ``rows``; returns the finalist rows and each row's
    candidate index.
    """
    # One proxy seed ranks the field, but a single head's seed moves held-out accuracy by 0.2-1.2 points
    # (most at small k), about the gaps between the leaders; so every candidate within ``finalist_band``
    # of the best is re-forecast as the mean over ``finalist_seeds`` seeds, and only finalists can be chosen.
    top = max(r["forecast"] for r in rows)
    finalists = [i for i, r in enumerate(rows) if r["forecast"] >= top - finalist_band]
    of = list(range(len(rows)))  # row -> its candidate in `planned`
    # The same finalists under each pool receiver mode: one row per (candidate, mode).
    base = list(finalists)
    for m in (m for m in modes if m != "plain"):
        for i in base:
            rows.append({**rows[i], "receiver": m, "forecast_seeds": 0})
            of.append(of[i])
            finalists.append(len(rows) - 1)
    if "plain" not in modes:  # plain only ranked the field: the receiver targeted is another
        finalists = finalists[len(base):]
    if finalist_seeds > 1 or modes != ["plain"]:
        items = [(of[r], seed + j, rows[r]["receiver"]) for r in finalists for j in range(finalist_seeds)]
        got = dict(zip(items, fc(items), strict=True))
        for r in finalists:
            m = rows[r]["receiver"]
            rows[r]["forecast"] = float(np.mean([got[of[r], seed + j, m] for j in range(finalist_seeds)]))
            rows[r]["forecast_seeds"] = finalist_seeds
            say(f"auto: finalist {rows[r]['name']} k={rows[r]['k']}, {m} receiver: forecast "
                f"{rows[r]['forecast']:.4f} ({finalist_seeds} seeds)")
    return finalists, of


def _choose(rows: list[dict], finalists: list[int], of: list[int], planned: list[Planned], modes: list[str],
            margin: float, size_of: SizeFn, budget_bytes: int | None) -> tuple[int, int]:
    """The first preferred row still within budget with its real forecast in the header: (row, its payload bytes).

    Marks every row's ``chosen`` and gives the chosen row its re-measured bytes; the others stay as sized,
    with a placeholder forecast of maximal width.
    """
    for r in _preference(rows, finalists, margin, modes):
        idx, sent = planned[of[r]].selection
        nbytes = int(size_of(idx, sent, rows[r]["forecast"], rows[r]["receiver"]))
        if budget_bytes is None or nbytes <= budget_bytes:
            for j, row in enumerate(rows):
                row["chosen"] = j == r
            rows[r]["bytes"] = nbytes
            return r, nbytes
    raise PladaError(f"no candidate fits the byte budget {budget_bytes} once its forecast is in the header")


def forecast_modes(
    *, pool_feats: np.ndarray, indices: np.ndarray, labels: np.ndarray, heldout_feats: np.ndarray,
    heldout_labels: np.ndarray, n_classes: int, modes: Sequence[str], expand: ExpandFn | None,
    head_steps: int = PROXY_STEPS, seeds: int = 3, seed: int = 0, workers: int | None = None,
) -> dict[str, float]:
    """One fixed selection's forecast under each receiver mode: proxy held-out accuracy, mean over ``seeds``.

    What a fixed-policy sender uses to name the receiver mode (the search does the same for its finalists).
    """
    idx, lab = np.asarray(indices, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if idx.ndim != 1 or len(idx) == 0 or lab.shape != idx.shape or idx.min() < 0 or idx.max() >= len(pool_feats):
        raise PladaError("a selection to forecast needs one label per kept pool image, and at least one image")
    if len(heldout_labels) == 0 or len(heldout_labels) != len(heldout_feats):
        raise PladaError("need one true label per held-out image and at least one image")
    if not modes or (list(modes) != ["plain"] and expand is None):
        raise PladaError("forecasting receiver modes other than plain needs their expand function")
    one = Planned(Policy("fixed"), len(idx), rate.Selection(idx, lab), 0)
    fc = _Forecaster([one], [np.arange(len(heldout_labels))], pool_feats, np.asarray(heldout_feats, np.float32),
                     np.asarray(heldout_labels), n_classes, head_steps, workers, expand)
    items = [(0, seed + j, m) for m in modes for j in range(seeds)]
    got = fc(items)
    return {m: float(np.mean(got[i * seeds:(i + 1) * seeds])) for i, m in enumerate(modes)}


def _check_search(deciders, pool_feats, heldout_feats, heldout_labels, n_classes, budget_bytes, k, policies,
                  finalist_seeds, finalist_band, fractions) -> list[np.ndarray]:
    """Refuse a malformed search before any payload is encoded; returns each decider's labels as int64."""
    if (budget_bytes is None) == (k is None):
        raise PladaError("give exactly one of a byte budget or a keep size")
    if not deciders:
        raise PladaError("the search needs at least one deciding teacher's scores")
    labs = []
    for d in deciders:
        labs.append(_check_inputs(d.labels, d.energy, d.entropy, pool_feats, heldout_feats, heldout_labels,
                                  n_classes))
        r = np.asarray(d.rows)
        if r.ndim != 1 or len(r) == 0 or r.dtype.kind not in "iu" or r.min() < 0 or r.max() >= len(heldout_labels):
            raise PladaError(f"a decider's held-out rows must index the {len(heldout_labels)} held-out images")
    n = len(labs[0])
    if k is not None and not (isinstance(k, int | np.integer) and 1 <= k <= n):
        raise PladaError(f"keep size must be an integer between 1 and the pool size {n}, got {k!r}")
    if budget_bytes is not None and (not isinstance(budget_bytes, int | np.integer) or budget_bytes < 1):
        raise PladaError(f"byte budget must be a positive integer, got {budget_bytes!r}")
    if not policies:
        raise PladaError("no candidate policies given")
    if not isinstance(finalist_seeds, int | np.integer) or finalist_seeds < 1 or not finalist_band >= 0:
        raise PladaError(f"finalist_seeds must be a positive integer and finalist_band >= 0, got {finalist_seeds!r} "
                         f"and {finalist_band!r}")
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise PladaError(f"keep-size fractions must lie in (0, 1], got {list(fractions)}")
    return labs


class _Forecaster:
    """Forecast of candidate i with proxy seed s under receiver mode m: held-out accuracy of a linear head
    trained on what that receiver makes of the selection (plain: the selection itself).

    Heads are trained in batches on ``workers`` threads (`train_heads`: the same weights as one at a time),
    and each distinct (selection, decider, seed, mode) only once; each (selection, mode) is expanded once.
    """

    def __init__(self, planned: list[Planned], parts: list[np.ndarray], pool_feats: np.ndarray,
                 heldout_feats: np.ndarray, heldout_labels: np.ndarray, n_classes: int, steps: int,
                 workers: int | None, expand: ExpandFn | None = None) -> None:
        self.planned, self.parts, self.pool_feats = planned, parts, pool_feats
        self.heldout_feats, self.heldout_labels = heldout_feats, heldout_labels
        self.n_classes, self.steps, self.workers, self.expand = n_classes, steps, workers, expand
        self.runs: dict[tuple[bytes, int, int, str], int] = {}
        self.expanded: dict[tuple[bytes, str], Any] = {}

    @staticmethod
    def _digest(c: Planned) -> bytes:
        return hashlib.sha256(c.selection.indices.tobytes() + c.selection.labels.tobytes()).digest()

    def _key(self, c: Planned, s: int, mode: str) -> tuple[bytes, int, int, str]:
        return self._digest(c), c.decider, s, mode

    def _rows(self, c: Planned, s: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
        if mode == "plain":
            return c.selection.indices, c.selection.labels
        key = (self._digest(c), mode)
        if key not in self.expanded:
            self.expanded[key] = self.expand(mode, c.selection.indices, c.selection.labels)  # type: ignore[misc]
        rows, lab = self.expanded[key].training_rows(s)
        order = np.argsort(rows, kind="stable")  # as the receiver's own head reads them
        return rows[order], lab[order]

    def __call__(self, items: Sequence[tuple[int, int, str]]) -> list[float]:
        todo: dict[tuple[bytes, int, int, str], tuple[Planned, int, str]] = {}
        for i, s, m in items:
            key = self._key(self.planned[i], s, m)
            if key not in self.runs:
                todo.setdefault(key, (self.planned[i], s, m))
        jobs = [head_job(self.pool_feats, *self._rows(c, s, m), self.n_classes, self.steps, s)
                for c, s, m in todo.values()]
        for key, (c, _, _), (w, b) in zip(todo, todo.values(), train_heads(jobs, self.workers), strict=True):
            r = self.parts[c.decider]
            self.runs[key] = int(((self.heldout_feats[r] @ w.T + b).argmax(1) == self.heldout_labels[r]).sum())
        return [self.runs[self._key(self.planned[i], s, m)] / len(self.parts[self.planned[i].decider])
                for i, s, m in items]


def _preference(rows: list[dict], finalists: list[int], margin: float, modes: Sequence[str] = ("plain",)
                ) -> list[int]:
    """Candidates in the order they are chosen: finalists by best forecast, ties to more images, then fewer
    bytes, then table order; then the rest. A candidate keeping every predicted class within ``margin`` of
    the best goes first, because a class missing from the payload can never be learnt by the receiver."""
    def rank(i: int) -> tuple:
        return -rows[i]["forecast"], -rows[i]["kept"], rows[i]["bytes"], i

    rest = {i for i, r in enumerate(rows) if r.get("receiver", "plain") in modes} - set(finalists)
    order = sorted(finalists, key=rank) + sorted(rest, key=rank)
    covering = [i for i in order if rows[i]["covers_predicted"]]
    if covering and rows[order[0]]["forecast"] - rows[covering[0]]["forecast"] <= margin:
        order = [covering[0]] + [i for i in order if i != covering[0]]
    return order
