"""Receiver modes: what the student trains on, given the payload and the whole unlabeled pool the receiver holds.

The payload labels a few hundred or thousand pool images; the receiver already holds all of the pool and
public pretrained weights. A mode turns the payload into the student's training set (pool rows, labels,
optional weights) using only those:

- ``plain``: the payload's kept images and labels, nothing else (the paper's receiver).
- ``selftrain``: a linear head on the payload images' frozen features labels the whole pool; the most
  confident images of each class join the training set, the head is refitted, for a few rounds.
- ``propagate``: label spreading (Zhou et al., 2004) from the payload images over a k-nearest-neighbour
  graph of the pool's frozen features; the most confident images of each class join the training set,
  weighted by how sure the spreading is (Iscen et al., 2019).
- ``head``: the payload carries a linear head in the pool's PCA space (`plada.head`, its `head` section); it labels
  the whole pool, which (with the payload's own images, if any) is the training set.

Every step is seeded or deterministic (stable sorts, ties broken by pool row), so one seed gives one
training set. The pool's features are computed once and memory-mapped (`features.cached_features`);
the kNN graph is computed in row chunks (never an N x N matrix), saved chunk by chunk so an interrupted
build resumes, and cached under the features' key. HEAD_SHARE was chosen on held-out target *train* images
(``python -m benchmarks.head_share``); the spreading constants are the published defaults of label spreading
(Zhou et al.; Iscen et al.) and PSEUDO_SHARE is hand-set (``python -m benchmarks.receiver`` grids them on
target train images, benchmarks/reports/RECEIVER.md).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .config import STUDENT_EPOCHS, ReceiveConfig, StudentConfig
from .data import atomic_save_npy, atomic_write, cache_root
from .errors import PladaError
from .payload import LABEL_RECEIVERS, Head
from .train import torch_threads, train_head

MODES = ReceiveConfig.MODES
LABEL_MODES = LABEL_RECEIVERS  # the modes that need only kept images and labels (head needs a head)

# Not yet chosen on data (see the module docstring): literature defaults and hand-set shares.
PSEUDO_SHARE = 0.05  # pseudo-labelled images: this share of the pool (balanced over classes)
SELFTRAIN_ROUNDS = 2  # label, refit, label again ...
ROUND_STEPS = 300  # head steps of each self-training round (the student's own head trains longer)
KNN_K = 20  # neighbours per pool image used by `propagate`
KNN_MAX = 50  # the cached graph keeps this many; a smaller k reads its first columns
KNN_DIM = 128  # PCA width the graph is computed in: 10x fewer flops than 1280-d, same neighbours mostly
SPREAD_ALPHA = 0.99  # label spreading: weight of the neighbours against the payload's own labels
SPREAD_ITERS = 40
PROPAGATE_WEIGHTED = True  # propagate: pseudo-labels weighted by the spreading's confidence (else all count 1)
EDGE_POWER = 3  # edge weight = cosine similarity ** EDGE_POWER (Iscen et al.): near neighbours count most
# head: this share of the pool, surest first and balanced over classes (the payload sends no images of its own).
# Chosen on held-out target train images (python -m benchmarks.head_share, benchmarks/reports/head_share.md):
# the whole pool gave the best mean linear student over 4 targets x 2 budgets (62.8% against 61.3% at 0.25)
HEAD_SHARE = 1.0
# A memory bound, not a tuned value: a linear student holds its rows' features in RAM (1280-d float32: 1 GB per
# 200,000 rows), and its 1,000 minibatches of 512 see each of 200,000 rows about 2.5 times, so more rows add
# little; on a 120,000-image pool it never binds, on ImageNet-21K it keeps a receive under a few GB
PSEUDO_MAX = 200_000  # pseudo-labelled images at most, whatever the share
FINETUNE_CAP = 6000  # a fine-tuned student trains on at most this many images ...
FINETUNE_STEP_FACTOR = 2.0  # ... and for at most this many times the steps the payload alone would take


@dataclass(frozen=True)
class Expansion:
    """A mode's output: the student's training set as pool rows, their labels and optional weights."""

    indices: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None
    info: dict = field(default_factory=dict)
    # per row, how sure the mode is of its label (the payload's own rows: 1); what `capped` keeps the surest by
    confidence: np.ndarray | None = None

    def training_rows(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, labels) to train on: weights become a seeded resample, so any trainer can use them.

        Why a resample and not a weighted loss: the shared trainers (`train_head`, `fit`) take plain
        labelled rows; drawing rows in proportion to their weight gives the same expected gradient.
        """
        if self.weights is None:
            return self.indices, self.labels
        p = np.asarray(self.weights, dtype=np.float64)
        p = p / p.sum()
        pick = np.sort(np.random.default_rng(seed).choice(len(self.indices), size=len(self.indices), p=p))
        return self.indices[pick], self.labels[pick]

    def capped(self, cap: int) -> Expansion:
        """At most ``cap`` rows: the payload's own rows first, then the surest pseudo-labels, class-balanced."""
        if len(self.indices) <= cap:
            return self
        n_payload = int(self.info.get("payload", 0))
        keep = np.arange(min(n_payload, cap))
        rest = np.arange(n_payload, len(self.indices))
        room = cap - len(keep)
        if room > 0 and len(rest):
            sure = self.confidence if self.confidence is not None else self.weights
            conf = sure[rest] if sure is not None else np.ones(len(rest))
            # round-robin over classes, surest first, so a cap never drops a whole class
            lab = self.labels[rest]
            rank = np.empty(len(rest), dtype=np.int64)
            for c in np.unique(lab):
                m = np.flatnonzero(lab == c)
                rank[m[np.lexsort((rest[m], -conf[m]))]] = np.arange(len(m))
            order = np.lexsort((rest, rank))
            keep = np.concatenate([keep, rest[order[:room]]])
        keep = np.sort(keep)
        w = None if self.weights is None else self.weights[keep]
        c = None if self.confidence is None else self.confidence[keep]
        return Expansion(self.indices[keep], self.labels[keep], w, {**self.info, "capped_to": int(cap)}, c)


def resolve_mode(explicit: str | None, named: str) -> tuple[str, str]:
    """(mode, where it came from): the caller's choice, else the one the payload header names.

    The header's mode is the one its sender's forecast assumed; `plada.payload` refuses a header naming
    a mode this plada lacks (`payload.RECEIVERS`), so a different receiver is only ever asked for.
    """
    if explicit is not None:
        if explicit not in MODES:
            raise PladaError(f"unknown receiver mode {explicit!r} (have: {', '.join(MODES)})")
        return explicit, "option"
    if named not in MODES:  # a payload module that knows more modes than this one: a bug, said plainly
        raise PladaError(f"the payload asks for receiver mode {named!r}, which this plada does not have")
    return named, "payload"


def expand(
    mode: str,
    feats: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    *,
    seed: int = 0,
    pseudo: int | None = None,
    k: int | None = None,
    rounds: int | None = None,
    weighted: bool | None = None,
    allowed: np.ndarray | None = None,
    graph_key: str | None = None,
    progress: bool = True,
    head: Head | None = None,
) -> Expansion:
    """The student's training set under ``mode`` from the payload's (pool rows, labels).

    ``feats`` are the pool's frozen features (a memory map is fine); ``allowed`` marks the pool rows that
    may be pseudo-labelled (rows a receiver's pool lacks are black squares: never); ``graph_key`` names
    the features for the kNN graph's cache (None: their file name or a content hash). ``pseudo`` (images
    to add), ``k``, ``rounds`` and ``weighted`` (propagate only: each pseudo-label weighted by the
    spreading's confidence) default to the validated constants above.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    if mode not in MODES:
        raise PladaError(f"unknown receiver mode {mode!r} (have: {', '.join(MODES)})")
    if len(indices) == 0 and mode != "head":
        raise PladaError("the payload keeps no images: nothing to train a student on"
                         + (" (it carries a head: receive it with --receiver head)" if head is not None else ""))
    if mode == "plain":
        return Expansion(indices, labels, None, {"mode": mode, "payload": len(indices), "pseudo": 0})
    share = HEAD_SHARE if mode == "head" else PSEUDO_SHARE
    pseudo = min(int(round(share * len(feats))), PSEUDO_MAX) if pseudo is None else pseudo
    pred, conf, ok, info = pool_labels(mode, feats, indices, labels, n_classes, seed=seed, pseudo=pseudo, k=k,
                                       rounds=rounds, allowed=allowed, graph_key=graph_key, progress=progress,
                                       head=head)
    weighted = PROPAGATE_WEIGHTED if weighted is None else weighted
    return from_pool_labels(indices, labels, pred, conf, ok, pseudo, n_classes, weighted and mode == "propagate",
                            info)


def pool_labels(
    mode: str, feats: np.ndarray, indices: np.ndarray, labels: np.ndarray, n_classes: int, *, seed: int = 0,
    pseudo: int, k: int | None = None, rounds: int | None = None, allowed: np.ndarray | None = None,
    graph_key: str | None = None, progress: bool = True, head: Head | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(label, confidence, may-be-pseudo-labelled mask, info) for every pool row under a pool mode.

    Split from `expand` so a caller trying several sizes of one spreading (the benchmark) spreads once.
    """
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(feats)
    ok = np.ones(n, dtype=bool) if allowed is None else np.asarray(allowed, dtype=bool).copy()
    ok[indices] = False  # the payload's own rows keep the sender's labels
    if mode == "selftrain":
        rounds = SELFTRAIN_ROUNDS if rounds is None else rounds
        pred, conf = _selftrain(feats, indices, labels, n_classes, ok, pseudo, rounds, seed, progress)
        return pred, conf, ok, {"mode": mode, "rounds": rounds}
    if mode == "head":
        if head is None:
            raise PladaError("receiver mode head needs a payload that carries a head; this one has none")
        from . import head as headmod

        pca = headmod.basis(feats, graph_key or basis_key(feats))
        pred, conf = _softmax_conf(headmod.pool_logits(feats, head, pca))
        return pred, conf, ok, {"mode": mode, "dim": head.dim, "bits": head.bits, "backbone": head.backbone}
    if mode != "propagate":
        raise PladaError(f"receiver mode {mode!r} does not label the pool")
    k = KNN_K if k is None else k
    if not 1 <= k <= KNN_MAX:
        raise PladaError(f"knn must be between 1 and {KNN_MAX}, got {k}")
    nbr, sim = knn_graph(feats, KNN_MAX, graph_key or _content_key(feats), progress=progress)
    pred, conf = _propagate(nbr[:, :k], sim[:, :k], indices, labels, n_classes, ok)
    return pred, conf, ok, {"mode": mode, "k": int(min(k, nbr.shape[1]))}


def from_pool_labels(indices: np.ndarray, labels: np.ndarray, pred: np.ndarray, conf: np.ndarray, ok: np.ndarray,
                     pseudo: int, n_classes: int, weighted: bool, info: dict) -> Expansion:
    """The payload plus the ``pseudo`` surest pool rows, class-balanced; weights from confidence if asked."""
    indices = np.asarray(indices, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    rows = _top_per_class(pred, conf, ok, pseudo, n_classes)
    w = np.concatenate([np.ones(len(indices)), np.clip(conf[rows], 1e-3, 1.0)]) if weighted else None
    hist = np.bincount(pred[rows], minlength=n_classes)
    return Expansion(np.concatenate([indices, rows]), np.concatenate([labels, pred[rows]]), w,
                     {**info, "payload": len(indices), "pseudo": int(len(rows)), "weighted": bool(weighted),
                      "pseudo_per_class": hist.tolist()},
                     np.concatenate([np.ones(len(indices)), np.asarray(conf[rows], dtype=np.float64)]))


def basis_key(feats: np.ndarray) -> str:
    """The cache key of the pool's PCA basis (`plada.head`): the same on the sender's and the receiver's side."""
    return _content_key(feats)


def _content_key(feats: np.ndarray) -> str:
    """A key for features that did not come with one: their file (a cached memory map) or their bytes."""
    name = getattr(feats, "filename", None)
    if name:
        return f"file:{Path(name).name}"
    return hashlib.blake2b(np.ascontiguousarray(feats).data, digest_size=16).hexdigest()


def _pool_logits(feats: np.ndarray, w: np.ndarray, b: np.ndarray, chunk: int = 16384) -> np.ndarray:
    out = np.empty((len(feats), len(b)), dtype=np.float32)
    for a in range(0, len(feats), chunk):
        out[a : a + chunk] = np.asarray(feats[a : a + chunk], dtype=np.float32) @ w.T + b
    return out


def _softmax_conf(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(1, keepdims=True)
    return p.argmax(1).astype(np.int64), p.max(1)


def _top_per_class(pred: np.ndarray, conf: np.ndarray, ok: np.ndarray, total: int, n_classes: int) -> np.ndarray:
    """The ``total`` surest allowed rows, an equal quota per class (a class short of candidates gives its
    room to the others), sorted by row. Ties are broken by row so the result never depends on sort order.

    Why balanced: a head fitted on a skewed payload over-predicts its big classes; a confidence ranking
    over the whole pool would then keep mostly those, and the student would inherit the skew.
    """
    total = int(min(total, ok.sum()))
    if total <= 0:
        return np.zeros(0, dtype=np.int64)
    cand = [np.flatnonzero(ok & (pred == c)) for c in range(n_classes)]
    ranked = [m[np.lexsort((m, -conf[m]))] for m in cand]
    quota = np.zeros(n_classes, dtype=np.int64)
    sizes = np.array([len(m) for m in ranked])
    left = min(total, int(sizes.sum()))
    while left > 0:  # water-filling: equal shares, capped by what each class has
        open_ = np.flatnonzero(quota < sizes)
        share = max(1, left // len(open_))
        for c in open_:
            take = min(share, sizes[c] - quota[c], left)
            quota[c] += take
            left -= take
            if left == 0:
                break
    return np.sort(np.concatenate([r[:q] for r, q in zip(ranked, quota, strict=True)]))


def _selftrain(feats: np.ndarray, indices: np.ndarray, labels: np.ndarray, n_classes: int, ok: np.ndarray,
               pseudo: int, rounds: int, seed: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(label, confidence) per pool row after ``rounds`` rounds of fit-label-select on frozen features."""
    if rounds < 1:
        raise PladaError(f"rounds must be at least 1, got {rounds}")
    rows, lab = indices, labels
    pred = conf = None
    for r in tqdm(range(1, rounds + 1), desc="self-training", disable=not progress, leave=False):
        with torch_threads(1):  # a head is too small to share two cores (see train.torch_threads)
            w, b = train_head(np.asarray(feats[np.sort(rows)]), lab[np.argsort(rows, kind="stable")], n_classes,
                              steps=ROUND_STEPS, seed=seed + r)
        pred, conf = _softmax_conf(_pool_logits(feats, w, b))
        if r < rounds:  # the next round fits on the payload and a growing share of the surest labels
            extra = _top_per_class(pred, conf, ok, int(math.ceil(pseudo * r / rounds)), n_classes)
            rows, lab = np.concatenate([indices, extra]), np.concatenate([labels, pred[extra]])
    return pred, conf


def _project(feats: np.ndarray, dim: int, chunk: int = 16384) -> np.ndarray:
    """L2-normalised, centred, PCA to ``dim`` and normalised again: cosine neighbours in a cheaper space."""
    n, d = feats.shape
    dim = min(dim, d)
    mean = np.zeros(d, dtype=np.float64)
    for a in range(0, n, chunk):
        x = _unit(np.asarray(feats[a : a + chunk], dtype=np.float32))
        mean += x.sum(0, dtype=np.float64)
    mean /= max(1, n)
    cov = np.zeros((d, d), dtype=np.float64)
    for a in range(0, n, chunk):
        x = _unit(np.asarray(feats[a : a + chunk], dtype=np.float32)) - mean
        cov += x.T.astype(np.float64) @ x.astype(np.float64)
    _, vecs = np.linalg.eigh(cov)
    basis = vecs[:, ::-1][:, :dim].astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for a in range(0, n, chunk):
        out[a : a + chunk] = _unit((_unit(np.asarray(feats[a : a + chunk], dtype=np.float32))
                                    - mean.astype(np.float32)) @ basis)
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def knn_graph(feats: np.ndarray, k: int, key: str, dim: int = KNN_DIM, chunk: int = 512, part_rows: int = 16384,
              progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, cosine similarities), each (N, k), nearest first, self excluded; cached under ``key``.

    Rows are computed ``chunk`` at a time against all others (a chunk x N block, never N x N) and saved
    every ``part_rows`` rows, so a killed build resumes where it stopped. ``key`` must identify the
    features' content (the feature cache's key does); the graph's own settings are added to it.
    """
    n = len(feats)
    k = int(min(k, n - 1))
    if k < 1:
        raise PladaError("a kNN graph needs at least two pool images")
    if n >= 2**24:  # the chunk files hold row numbers as float32, exact below 2**24
        raise PladaError("pools of 2**24 images or more are too large for the kNN graph's chunk files")
    tag = hashlib.sha256(f"{key}:{n}:{feats.shape[1]}:{k}:{dim}:v1".encode()).hexdigest()[:20]
    root = cache_root() / "knn"
    path = root / f"{tag}.npz"
    try:
        with np.load(path) as z:
            nbr, sim = z["nbr"], z["sim"]
        if nbr.shape == (n, k) and sim.shape == (n, k) and nbr.min() >= 0 and nbr.max() < n:
            return nbr, sim
    except (OSError, ValueError, EOFError, KeyError):  # absent or torn: computed again
        pass
    parts = root / f"{tag}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    z = torch.from_numpy(_project(feats, dim))
    nbr = np.empty((n, k), dtype=np.int32)
    sim = np.empty((n, k), dtype=np.float32)
    bar = tqdm(total=n, desc="kNN graph", unit="img", disable=not progress, leave=False)
    for p0 in range(0, n, part_rows):
        p1 = min(n, p0 + part_rows)
        pfile = parts / f"{p0:09d}.npy"
        try:
            block = np.load(pfile)
            if block.shape != (p1 - p0, 2 * k):
                raise ValueError
        except (OSError, ValueError, EOFError):
            block = np.empty((p1 - p0, 2 * k), dtype=np.float32)
            for a in range(p0, p1, chunk):
                b = min(p1, a + chunk)
                s = z[a:b] @ z.T
                s[torch.arange(b - a), torch.arange(a, b)] = -float("inf")
                v, i = torch.topk(s, k, dim=1)
                v, i = v.numpy(), i.numpy()
                order = _row_order(v, i)
                block[a - p0 : b - p0, :k] = np.take_along_axis(i, order, 1)
                block[a - p0 : b - p0, k:] = np.take_along_axis(v, order, 1)
                bar.update(b - a)
            try:
                parts.mkdir(parents=True, exist_ok=True)
                atomic_save_npy(pfile, block)
            except OSError:  # a part only saves work on a resume; a concurrent build of this graph removes them
                pass
        else:
            bar.update(p1 - p0)
        nbr[p0:p1] = block[:, :k].astype(np.int32)
        sim[p0:p1] = block[:, k:]
    bar.close()
    atomic_write(path, lambda f: np.savez(f, nbr=nbr, sim=sim))
    shutil.rmtree(parts, ignore_errors=True)
    return nbr, sim


def _row_order(v: np.ndarray, i: np.ndarray) -> np.ndarray:
    """Per row: by similarity, highest first, ties by neighbour row (topk's own tie order is not promised)."""
    by_row = np.argsort(i, axis=1, kind="stable")
    by_sim = np.argsort(-np.take_along_axis(v, by_row, 1), axis=1, kind="stable")
    return np.take_along_axis(by_row, by_sim, 1)


def _propagate(nbr: np.ndarray, sim: np.ndarray, indices: np.ndarray, labels: np.ndarray, n_classes: int,
               ok: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label, confidence) per pool row by label spreading from the payload rows over the kNN graph.

    F <- alpha S F + (1 - alpha) Y with S = D^-1/2 W D^-1/2, W the symmetrised graph (sim ** EDGE_POWER),
    iterated a fixed number of times (deterministic, no solver tolerance). Columns are then divided by
    their mass (class-mass normalisation, Zhu et al. 2003) so a class with many payload images does not
    swallow its neighbours; confidence is the winning class's share of the row.
    """
    n, k = nbr.shape
    usable = ok.copy()
    usable[indices] = True
    w = np.clip(sim, 0, None).astype(np.float64) ** EDGE_POWER
    w[~usable] = 0
    w[~usable[nbr]] = 0
    rows = np.repeat(np.arange(n), k)
    cols = nbr.reshape(-1).astype(np.int64)
    vals = w.reshape(-1) / 2
    r = np.concatenate([rows, cols])
    c = np.concatenate([cols, rows])
    v = np.concatenate([vals, vals])
    W = torch.sparse_coo_tensor(torch.from_numpy(np.stack([r, c])), torch.from_numpy(v), (n, n),
                                check_invariants=False).coalesce()
    deg = torch.zeros(n, dtype=torch.float64).index_add_(0, W.indices()[0], W.values())
    dinv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    ii = W.indices()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": the one product used here is not
        warnings.simplefilter("ignore", UserWarning)
        S = torch.sparse_coo_tensor(ii, W.values() * dinv[ii[0]] * dinv[ii[1]], (n, n),
                                    check_invariants=False).coalesce().to_sparse_csr()
    Y = torch.zeros((n, n_classes), dtype=torch.float64)
    Y[torch.from_numpy(indices), torch.from_numpy(labels)] = 1.0
    Y /= Y.sum(0, keepdim=True).clamp_min(1.0)  # each class's seeds carry one unit of mass
    F = Y.clone()
    for _ in range(SPREAD_ITERS):
        F = SPREAD_ALPHA * (S @ F) + (1 - SPREAD_ALPHA) * Y
    F = F / F.sum(0, keepdim=True).clamp_min(1e-300)
    F = F.numpy()
    tot = F.sum(1)
    reached = tot > 0  # rows no payload label reached keep label -1: never pseudo-labelled
    pred = np.where(reached, F.argmax(1), -1).astype(np.int64)
    conf = np.where(reached, F.max(1) / np.where(reached, tot, 1), 0.0)
    return pred, conf


def finetune_budget(n_rows: int, n_payload: int, epochs: float, batch_size: int) -> float:
    """Epochs for a fine-tuned student on an expanded set: at most FINETUNE_STEP_FACTOR x the steps the
    payload alone would take, so a pool mode costs a receiver a bounded multiple of the plain receive."""
    plain_steps = max(1, math.ceil(n_payload / batch_size)) * epochs
    per_epoch = max(1, math.ceil(n_rows / batch_size))
    return float(min(epochs, FINETUNE_STEP_FACTOR * plain_steps / per_epoch))


def student_recipe(exp: Expansion, student: StudentConfig, mode: str, n_payload: int, pool_size: int
                   ) -> tuple[Expansion, StudentConfig]:
    """The training set and recipe a pool mode's student gets: one rule for `plada receive` and the benchmarks.

    A linear student trains on every expanded row (a head is cheap); any other student on at most
    FINETUNE_CAP of them for a bounded number of steps (`finetune_budget`). A head payload keeps few images
    or none, so its cost is bounded as if it kept the paper's 1% of the pool.
    """
    if student.mode == "linear" or mode == "plain":
        return exp, student
    exp = exp.capped(FINETUNE_CAP)
    ref = max(n_payload, pool_size // 100) if mode == "head" else n_payload
    epochs = STUDENT_EPOCHS[0] if student.epochs is None else student.epochs  # the paper's 15 as the reference
    return exp, replace(student, epochs=finetune_budget(len(exp.indices), ref, epochs, student.batch_size))


def fit_head(feats: np.ndarray, exp: Expansion, n_classes: int, steps: int = 1000, seed: int = 0
             ) -> tuple[np.ndarray, np.ndarray]:
    """A linear student's head on an expansion's rows of the pool features (weights as a seeded resample)."""
    rows, lab = exp.training_rows(seed)
    order = np.argsort(rows, kind="stable")  # memory maps read fastest in row order
    with torch_threads(1):
        return train_head(np.asarray(feats[rows[order]]), lab[order], n_classes, steps=steps, seed=seed)
