"""Does the sender's automatic policy choice (plada.auto) match the best fixed policy chosen in hindsight?

    python -m benchmarks.auto_policy            # results/auto_policy.json, benchmarks/reports/AUTO_POLICY.md
    python -m benchmarks.auto_policy --quick    # small subset (also run by the test suite)
    python -m benchmarks.auto_policy --deciders 1 --search-seed 2  # one deciding teacher, third seed
    python -m benchmarks.auto_policy --targets flowers5 gtsrb32 --search-seed 1  # results/auto_policy_seed1.json
    python -m benchmarks.auto_policy --eval-split validation --targets flowers5 --out-dir /tmp/ap_flowers5
    python -m benchmarks.auto_policy --eval-split validation --merge /tmp/ap_*/results/auto_policy_val.json
        # one target per session on validation rows, then one results/auto_policy_val.json and AUTO_POLICY_val.md

Same pool, teachers, pool scores and frozen features as benchmarks.paper (its Config, caches and teacher
recipe are reused, so a finished paper run makes this one cheap). Per target and byte budget (about 1, 5
and 20 KB): held-out = target train images the teacher did not train on; when the teacher used all of
train, exactly what `plada send --budget` does: deciding teachers are fine-tuned, each without its own
slice of train (default `auto.DECIDERS` = 2 teachers, slices of 20%, whole groups if any; `auto.decider_plan`),
and the candidates are the deciding teachers' own selections, each forecast on its own held-out rows.
The auto search picks a policy and
keep size by the held-out accuracy of a proxy linear head; then every candidate of that search is
measured on the test split with the paper's linear student (seed 0 for all; the leaders within
`eval_band` of the best get the other `eval_seeds` too, and their accuracy is the mean), which gives the
auto choice's accuracy, the best candidate in hindsight, and the forecast error.

The hindsight best is the best of the full teacher's selections (the fixed policies a user could pick).
Earlier modes (the full teacher's selection sent, K-fold cross-fitting) are in benchmarks/HISTORY.md.

`--eval-split validation` (for tuning defaults, issue 17: never on the test split): before anything else a
seeded validation split V is carved out of the target's train split (`carve_validation`: `VAL_FRACTION` of
train, at most `VAL_LIMIT` images, seed `VAL_SEED`; whole groups where the target has `holdout_groups`).
Everything above then treats train − V as the train split (teacher, deciding teachers, relevance key,
held-out slices) and measures on V wherever it would measure on the test split, which is never read.
Outputs get a `_val` suffix. `--merge` combines per-target runs of one setting into one results file, named
as a run with the same flags (`--eval-split`, `--quick`, ...) would be.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import paper
from plada import auto, rate
from plada.data import Split, cache_root
from plada.errors import PladaError
from plada.features import cached_features, feature_model, rows_features, split_key
from plada.pipeline import decide
from plada.pool import Pool
from plada.score import score_pool
from plada.train import head_job, train_heads

BUDGETS = (1000, 5000, 20000)
EVAL_SPLITS = ("test", "validation")
VAL_SUFFIX = "_val"  # names the outputs of a validation run
# --eval-split validation: V = this share of the target's train split, at most VAL_LIMIT images, drawn with
# VAL_SEED (fixed; not a search seed, so V is one set whatever --search-seed a run uses)
VAL_FRACTION, VAL_LIMIT, VAL_SEED = 0.2, 5000, 17


@dataclass
class AutoConfig(paper.Config):
    budgets: tuple[int, ...] = BUDGETS
    heldout_limit: int = 5000  # held-out images scored by the proxy (a seeded subsample when more are unseen)
    relevance_limit: int = 5000  # target train images the nearest-target policy compares the pool with
    proxy_steps: int = auto.PROXY_STEPS  # head steps of each proxy student in the search
    eval_seeds: tuple[int, ...] = (0, 1, 2)  # linear-student seeds on the test split (the first for all candidates)
    eval_band: float = 0.02  # candidates within this of the best first-seed accuracy get every eval seed
    # when the teacher used all of train, as plada send's deciders / holdout_fraction (None: auto.decider_plan's
    # defaults, auto.DECIDERS teachers each without its own auto.HOLDOUT_FRACTION slice)
    deciders: int | None = None
    holdout_fraction: float | None = None
    search_seed: int = 0
    fractions: tuple[float, ...] = auto.DEFAULT_FRACTIONS  # keep sizes tried: these shares of the largest that fits
    # plada send --holdout-groups per target: GTSRB's train split is 5 frames of each sign's track (TRACK_FRAME.png)
    holdout_groups: dict[str, str] = field(default_factory=lambda: {"gtsrb32": r"^(\d+)_"})
    eval_split: str = "test"  # "validation": measured on rows carved from train (carve_validation), never test
    val_fraction: float = VAL_FRACTION
    val_limit: int = VAL_LIMIT
    val_seed: int = VAL_SEED


def quick_config(cfg: AutoConfig) -> AutoConfig:
    """paper.quick_config (so quick teachers and features are shared) plus a smaller search."""
    cfg = paper.quick_config(cfg)
    cfg.heldout_limit, cfg.relevance_limit, cfg.proxy_steps = 300, 300, 100
    cfg.eval_seeds = (0, 1)
    return cfg


def split_features(fm, train: Split, src_root: Path, idx: np.ndarray, what: str) -> np.ndarray:
    """Features of some train rows, cached under a key naming exactly those rows (and the split by its name:
    "train", or train − V's own name in validation mode)."""
    return rows_features(fm, train.images, idx, f"{split_key(src_root, train.split, len(train))}/{what}",
                         progress=False)


def validation_rows(n: int, cfg: AutoConfig, groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(rows kept as train, validation rows V) of a train split of ``n`` images, both sorted: a seeded
    ``cfg.val_fraction`` of the rows, at most ``cfg.val_limit``. With ``groups`` (one id per row,
    `auto.name_groups`) whole groups in seeded order while they fit, so no group straddles the two sides."""
    if groups is None:
        return auto.holdout_split(n, cfg.val_fraction, cfg.val_seed, limit=cfg.val_limit)
    m = max(1, min(int(round(cfg.val_fraction * n)), cfg.val_limit))
    _, inv, counts = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    order = np.random.default_rng(cfg.val_seed).permutation(len(counts))
    chosen = order[: max(1, int(np.searchsorted(np.cumsum(counts[order]), m, side="right")))]
    val = np.isin(inv.reshape(-1), chosen)
    if val.all():
        raise PladaError(f"cannot hold out whole groups for validation: the train split has {len(counts)} group(s)")
    return np.flatnonzero(~val), np.flatnonzero(val)


def carve_validation(train: Split, cfg: AutoConfig, pattern: str | None) -> tuple[Split, Split]:
    """(train − V, V) for `--eval-split validation` (`validation_rows`; groups by ``pattern`` when given).

    Each is named for what it is (`Split.split`: "val<seed>-<digest of V's rows>" and "train-minus-" that):
    feature and teacher caches key on a split's name and length, so V or train − V must never pass for the
    test or train split of the same length (nor for another V).
    """
    groups = auto.name_groups(train.files, pattern) if pattern else None
    keep, val = validation_rows(len(train), cfg, groups)
    tag = f"val{cfg.val_seed}-{hashlib.sha256(val.astype(np.int64).tobytes()).hexdigest()[:12]}"
    return (dataclasses.replace(train.take(keep), split=f"train-minus-{tag}"),
            dataclasses.replace(train.take(val), split=tag))


def relevance_key(fm, train: Split, src_root: Path, pool_f: np.ndarray, idx: np.ndarray,
                  cfg: AutoConfig) -> np.ndarray:
    """The nearest-target rank key from the train rows `idx` a teacher trained on (at most `relevance_limit`)."""
    sub = auto.subsample(idx, cfg.relevance_limit, cfg.search_seed + 1)
    return auto.nearest_target_key(pool_f, split_features(fm, train, src_root, sub, "auto-relevance"))


def run_target(target: str, pool: Pool, cfg: AutoConfig, data: str | None, log) -> dict:
    t0 = time.time()
    pattern = cfg.holdout_groups.get(target)
    on_val = cfg.eval_split == "validation"  # then "train" is train − V and "test" is V: the test split unread
    holdout = (lambda tr: carve_validation(tr, cfg, pattern)) if on_val else None
    src, train, test, tcfg, teacher, tinfo = paper.target_teacher(target, cfg, data, holdout)
    n_cls = len(train.class_names)
    log(f"[{target}] teacher {cfg.teacher}: {cfg.eval_split} accuracy {tinfo['test_accuracy']:.4f}")
    seen = train.subset_indices(tcfg.limit, tcfg.seed)
    unseen = np.setdiff1d(np.arange(len(train)), seen)
    refit = len(unseen) == 0
    tgroups = auto.name_groups(train.files, pattern) if pattern else None
    if tgroups is not None and not refit:  # as plada send: a seen group's other images are not new
        unseen = unseen[~np.isin(tgroups[unseen], tgroups[seen])]
    scores = score_pool(teacher, pool, cache_root() / "scores")  # the teacher whose labels are sent
    gid = pool.groups()[0]
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    key_s = [0.0]

    def ref_key(idx: np.ndarray) -> np.ndarray:
        t = time.time()
        key = relevance_key(fm, train, src.root, pool_f, idx, cfg)
        key_s[0] += time.time() - t
        return key

    energy, entropy, conf = scores.energy(), scores.entropy(), rate.confidence(scores.logits)
    n_dec = frac = None
    if refit:  # as plada send: deciding teachers, each scored on the slice it never saw
        n_dec, frac = auto.decider_plan(cfg.deciders, cfg.holdout_fraction)
        held, deciders = decide(train, None, pool, tcfg, n_dec, frac, cfg.search_seed, ref_key,
                                held_limit=cfg.heldout_limit, groups=tgroups, progress=False)
        secs = [d.train_seconds for d in deciders]
        nearest = ref_key(np.arange(len(train)))
        what = f"a seeded {frac:.0%} slice" if n_dec == 1 else f"{n_dec} disjoint seeded {frac:.0%} slices (one each)"
        note = (f"the teacher trained on all {len(train)} train images, so (as `plada send` does) "
                f"{n_dec} deciding teacher(s) were fine-tuned without {what}; {len(held)} held-out images "
                "in all, each scored only by a teacher that never saw it; each candidate is one deciding teacher's "
                "own selection, sized with its labels, forecast on its own slice and sent as it is")
        if tgroups is not None:
            note += (f"; slices hold out whole groups ({len(np.unique(tgroups))} groups from file names by "
                     f"`holdout_groups='{pattern}'`)")
        log(f"[{target}] {n_dec} deciding teacher(s): {secs} s")
    else:
        held = auto.subsample(unseen, cfg.heldout_limit, cfg.search_seed)
        nearest = ref_key(seen)
        deciders = [auto.Decider(scores.labels, energy, entropy, np.arange(len(held)), conf, nearest)]
        note = f"{len(held)} of the {len(unseen)} train images the teacher never saw"
    nearest_s = round(key_s[0], 1)
    log(f"[{target}] held-out: {note}; nearest-target keys {nearest_s} s")

    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, test.split, len(test))))
    held_f = split_features(fm, train, src.root, held, "auto-heldout")

    size_of = auto.payload_sizer(pool.fingerprint, len(pool), train.class_names, groups=gid)
    measured: dict[tuple[bytes, int], np.ndarray] = {}  # (selection digest, seed) -> test image correct?

    def as_sent(row: dict) -> rate.Selection:
        pol = auto.Policy(row["policy"], row["safety_share"], row["alpha"], row["tau"])
        if row.get("decider") is not None:  # a deciding teacher's own selection
            d = deciders[row["decider"]]
            return auto.selector(pol, labels=d.labels, energy=d.energy, entropy=d.entropy, n_classes=n_cls,
                                 seed=cfg.search_seed, nearest_key=d.nearest_key, groups=gid,
                                 confidence=d.confidence)(row["k"])
        return auto.selector(pol, labels=scores.labels, energy=energy, entropy=entropy, n_classes=n_cls,
                             seed=cfg.search_seed, nearest_key=nearest, groups=gid, confidence=conf)(row["k"])

    def fixed_rows(budget: int) -> list[dict]:
        """The full teacher's candidates as the default search sizes them, unforecast: the hindsight field."""
        plan = auto.plan_candidates(auto.DEFAULT_POLICIES, labels=scores.labels, energy=energy, entropy=entropy,
                                    n_classes=n_cls, size_of=size_of, budget_bytes=budget,
                                    nearest_key=nearest, groups=gid, confidence=conf, seed=cfg.search_seed,
                                    fractions=cfg.fractions)
        return [{**c.row(n_cls), "forecast": None, "forecast_seeds": 0, "chosen": False} for c in plan]

    def test_accuracies(sels: list[rate.Selection], seeds: tuple[int, ...]) -> list[float]:
        """Mean test accuracy over `seeds` of the linear student on each selection; heads trained together."""
        digests = [hashlib.sha256(sel.indices.tobytes() + sel.labels.tobytes()).digest() for sel in sels]
        todo = {(d, s): sel for d, sel in zip(digests, sels, strict=True) for s in seeds if (d, s) not in measured}
        jobs = [head_job(pool_f, sel.indices, sel.labels, n_cls, cfg.head_steps, s) for (_, s), sel in todo.items()]
        for key, (w, b) in zip(todo, train_heads(jobs), strict=True):
            measured[key] = (test_f @ w.T + b).argmax(1) == test.labels
        return [float(np.mean([measured[d, s].mean() for s in seeds])) for d in digests]

    def per_image(sel: rate.Selection, seeds: int) -> np.ndarray:
        """Each test image's share of correct students over the first `seeds` eval seeds."""
        d = hashlib.sha256(sel.indices.tobytes() + sel.labels.tobytes()).digest()
        return np.mean([measured[d, s] for s in cfg.eval_seeds[:seeds]], axis=0)

    cells: dict[str, dict] = {}
    for budget in cfg.budgets:
        t1 = time.time()
        try:
            ch = auto.search(deciders=deciders, pool_feats=pool_f, heldout_feats=held_f,
                             heldout_labels=train.labels[held], n_classes=n_cls, size_of=size_of,
                             budget_bytes=int(budget), groups=gid, head_steps=cfg.proxy_steps, seed=cfg.search_seed,
                             fractions=cfg.fractions)
        except PladaError as e:
            cells[str(budget)] = {"error": str(e)}
            log(f"[{target}] {budget} B: {e}")
            continue
        search_s = round(time.time() - t1, 1)
        rows = ch.candidates
        if any(r["decider"] is not None for r in rows):  # deciders' own selections: add the full teacher's
            rows = rows + fixed_rows(int(budget))
        sels = [as_sent(row) for row in rows]
        for row, acc in zip(rows, test_accuracies(sels, cfg.eval_seeds[:1]), strict=True):
            row["test_accuracy"], row["test_seeds"] = acc, 1
        lead = max(r["test_accuracy"] for r in rows)
        leaders = [i for i, r in enumerate(rows) if r["chosen"] or r["test_accuracy"] >= lead - cfg.eval_band]
        for i, acc in zip(leaders, test_accuracies([sels[i] for i in leaders], cfg.eval_seeds), strict=True):
            rows[i]["test_accuracy"], rows[i]["test_seeds"] = acc, len(cfg.eval_seeds)
        chosen = next(r for r in rows if r["chosen"])
        fixed = [r for r in rows if r.get("decider") is None]  # the full teacher's selections: fixed policies
        best = max(fixed, key=lambda r: (r["test_accuracy"], -r["bytes"]))
        best_any = max(rows, key=lambda r: (r["test_accuracy"], -r["bytes"]))
        ci = paired_bootstrap(per_image(sels[rows.index(chosen)], chosen["test_seeds"]),
                              per_image(sels[rows.index(best)], best["test_seeds"]))
        tops: dict[str, dict] = {}
        for r in fixed:  # each policy at its largest affordable size
            if r["k"] > tops.get(r["name"], {"k": 0})["k"]:
                tops[r["name"]] = r
        pick = ("name", "policy", "safety_share", "alpha", "k", "bytes", "forecast", "test_accuracy", "test_seeds",
                "classes_kept")
        cells[str(budget)] = {
            "auto": {**{k: v for k, v in ch.summary().items() if k != "candidates"},
                     **{k: chosen[k] for k in pick if k.startswith(("test_", "classes_"))}},
            "hindsight": {k: best[k] for k in pick},
            "default": {k: tops["lowest-energy"][k] for k in pick} if "lowest-energy" in tops else None,
            "largest": {name: r["test_accuracy"] for name, r in tops.items()},
            "gap": chosen["test_accuracy"] - best["test_accuracy"],
            "hindsight_any": {k: best_any[k] for k in (*pick, "decider")},
            "gap_ci95": ci,
            "forecast_error": ch.forecast - chosen["test_accuracy"],
            "search_seconds": search_s,
            "candidates": rows,
        }
        log(f"[{target}] {budget} B: auto {ch.name} k={ch.k} ({ch.payload_bytes} B) forecast {ch.forecast:.4f} "
            f"{cfg.eval_split} {chosen['test_accuracy']:.4f}; hindsight {best['name']} k={best['k']} "
            f"{best['test_accuracy']:.4f} "
            f"(search {search_s} s)")
    return {
        "target": target, "classes": n_cls, "train_images": len(train), "test_images": len(test),
        "teacher": {"model": cfg.teacher, "res": cfg.teacher_res, "accuracy": tinfo["test_accuracy"],
                    "train_images": len(seen)},
        "heldout": {"images": len(held), "refit": refit, "note": note, "group_pattern": pattern,
                    "groups": None if tgroups is None else int(len(np.unique(tgroups)))},
        "folds": n_dec, "holdout_fraction": frac, "send": "decider" if refit else "teacher",
        "nearest_key_seconds": nearest_s,
        "pseudo_label_hist": np.bincount(scores.labels, minlength=n_cls).tolist(),
        "budgets": cells, "seconds": round(time.time() - t0, 1),
        **({"validation": {"images": len(test), "train_images_left": len(train), "seed": cfg.val_seed,
                           "fraction": cfg.val_fraction, "limit": cfg.val_limit, "split": test.split,
                           "group_pattern": pattern}} if on_val else {}),
    }


def paired_bootstrap(a: np.ndarray, b: np.ndarray, reps: int = 10000, seed: int = 0) -> list[float]:
    """95% interval of mean(a - b) over test images resampled with replacement (paired: same images).

    What it covers: which test images happened to be drawn, for these trained students. What it does not:
    that the hindsight best was picked on this very test split (its lead is biased upwards).
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(reps)])
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def fixed_policy_summary(res: dict) -> dict:
    """Per budget: each policy at its largest affordable size, averaged over targets, against auto's average.

    The one-policy-for-everything a user would otherwise pick, chosen in hindsight across all targets.
    """
    out: dict[str, dict] = {}
    for b in map(str, res["config"]["budgets"]):
        cells = [r["budgets"][b] for r in res["targets"].values() if "error" not in r["budgets"].get(b, {"error": 1})]
        if not cells:
            continue
        names = set.intersection(*(set(c["largest"]) for c in cells))
        fixed = {n: float(np.mean([c["largest"][n] for c in cells])) for n in sorted(names)}
        best = max(fixed, key=fixed.get) if fixed else None
        out[b] = {"targets": len(cells), "auto_mean": float(np.mean([c["auto"]["test_accuracy"] for c in cells])),
                  "fixed_mean": fixed, "best_fixed": best}
    return out


def ci_text(cell: dict) -> str:
    ci = cell.get("gap_ci95")
    return f" [{pts(ci[0])}, {pts(ci[1])}]" if ci else ""


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def decider_words(cfg: dict) -> str:
    """How a run's deciding teachers held out train, from its config (also older runs': `folds` with a fraction
    meant disjoint slices before `deciders` existed, and one teacher was the default)."""
    folds, dec, frac = cfg.get("folds"), cfg.get("deciders"), cfg.get("holdout_fraction")
    if folds and folds > 1 and frac is None:
        return f"{folds} deciding teachers, each fine-tuned without one part of a {folds}-fold partition of train"
    n = dec or folds or auto.DECIDERS
    share = (f"seeded {frac:.0%} slice of train" if frac is not None else
             "seeded slice of train (10%, 20% when whole groups are held out)")
    return f"{n} deciding teacher(s), each fine-tuned without its own {share}" + (", slices disjoint" if n > 1 else "")


def validation_words(cfg: dict) -> list[str]:
    """The paragraph that says a run's figures are on validation rows carved from train (none for test runs)."""
    if cfg.get("eval_split", "test") != "validation":
        return []
    return [f"**Validation run (`--eval-split validation`): every accuracy below is measured on validation rows V "
            f"carved from each target's train split (a seeded {cfg['val_fraction']:.0%} of train, at most "
            f"{cfg['val_limit']:,} images, seed {cfg['val_seed']}; whole groups where the target has held-out "
            "groups), never on the test split, which this run did not read.** Teacher, deciding teachers, "
            "relevance key and held-out slices used train − V as the train split; columns say *val* where a test "
            "run says *test*, and the JSON keeps its `test_*` field names for these validation figures.", ""]


def write_markdown(res: dict, path: Path) -> None:
    cfg = res["config"]
    on_val = cfg.get("eval_split", "test") == "validation"
    col, split, images = ("val", "V", "validation images") if on_val else ("test", "the test split", "test images")
    title = "# Auto policy: the sender picks the selection for a byte budget"
    if cfg.get("send", "decider") == "decider":
        title += " (a deciding teacher's own selection is sent)"
    L = [title, "",
         f"Command: `{res['command']}` — wall time {res['wall_seconds'] / 60:.1f} min on {res['machine']}.", "",
         *validation_words(cfg),
         f"Pool: `{cfg['pool']}` ({res['pool_size']:,} images); teachers, pool scores and features as in "
         "`benchmarks.paper`. For each target and byte budget, `plada.auto.search` tries every candidate policy "
         "(lowest / highest energy, lowest entropy, random, nearest-to-target, Safety-Net s ∈ {0.1, 0.3} × "
         "α ∈ {0.5, −0.2}, whole pool folders by mean energy with the teacher's labels (tau=0) or each folder's "
         "majority label (tau=1)) at the largest keep size whose real `.plada` file (context codec, the pool's "
         "folders as groups, as `plada send` writes it) fits the budget and at "
         + ", ".join(f"{f:g}" for f in cfg.get("fractions", (1.0, 0.5, 0.25)) if f != 1) + " of it, "  # (older runs)
         f"trains a proxy linear head ({cfg['proxy_steps']} steps) per candidate and picks the best held-out "
         f"accuracy (the *forecast*). Every candidate is then measured on {split} with the paper's linear "
         f"student ({cfg['head_steps']} steps; seed {cfg['eval_seeds'][0]} for every candidate, then the mean over "
         f"seeds {list(cfg['eval_seeds'])} for the auto choice and every candidate within "
         f"{100 * cfg['eval_band']:g} points of the best first-seed accuracy): *hindsight* is the best of them, "
         f"*gap* = auto − hindsight, *forecast error* = forecast − auto's {col} accuracy, *default* = lowest energy "
         "at the largest size that fits. Where the teacher trained on all of train, the search decides with "
         f"{decider_words(cfg)} (`auto.Decider`), as `plada send` does; "
         + ("the candidates are each deciding teacher's own selections (`plada send --auto-send decider`), each "
            "forecast on its own held-out rows and sent as it is (its labels, not the full teacher's); hindsight "
            "is the best of the full teacher's selections (the fixed policies, sized as `--auto-send teacher` "
            "sizes them), so gaps compare across modes. " if cfg.get("send", "decider") == "decider" else
            "sizes and labels sent are the full teacher's (`plada send --auto-send teacher`). ")
         + "The search re-forecasts its "
         "finalists (within 2 points of the best proxy) over 3 proxy seeds. Accuracies in %.", "",
         f"| target | budget | auto choice (k, bytes) | forecast | auto {col} | forecast error | hindsight best (k) | "
         f"hindsight {col} | gap (95% CI) | default {col} | search s |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    gaps, errs, cis = [], [], []
    for t, r in res["targets"].items():
        for b, c in r["budgets"].items():
            if "error" in c:
                L.append(f"| {t} | {int(b):,} B | error: {c['error']} |  |  |  |  |  |  |  |  |")
                continue
            a, h, d = c["auto"], c["hindsight"], c["default"]
            gaps.append(c["gap"])
            errs.append(c["forecast_error"])
            cis.append(c.get("gap_ci95"))
            fold = f" [fold {a['decider']}]" if a.get("decider") is not None else ""
            L.append(f"| {t} | {int(b):,} B | {a['name']}{fold} ({a['k']:,}, {a['payload_bytes']:,} B) | "
                     f"{pct(a['forecast'])} | {pct(a['test_accuracy'])} | {pts(c['forecast_error'])} | "
                     f"{h['name']} ({h['k']:,}) | "
                     f"{pct(h['test_accuracy'])} | {pts(c['gap'])}{ci_text(c)} | "
                     f"{pct(d['test_accuracy']) if d else '–'} | "
                     f"{c['search_seconds']} |")
    L += ["", "Held-out images per target:", ""]
    L += [f"- **{t}**: " + (f"V = {r['validation']['images']:,} validation rows, "
                            f"{r['validation']['train_images_left']:,} train rows left; " if "validation" in r else "")
          + f"{r['heldout']['note']}." for t, r in res["targets"].items()]
    if gaps:
        within = sum(g >= -0.01 for g in gaps)
        close = sum(abs(e) <= 0.05 for e in errs)
        L += ["", "## Against the goals", "",
              f"- Auto within 1 point of the hindsight best: {within} of {len(gaps)} cells (worst gap "
              f"{pts(min(gaps))} points).",
              f"- Forecast within 5 points of the measured accuracy: {close} of {len(errs)} cells (largest error "
              f"{pts(max(errs, key=abs))} points).",
              f"- Hindsight picks the best of all candidates on {split} itself, so it is an optimistic "
              "bound (its maximum also rides on what evaluation noise the seed mean leaves)."]
        if all(ci is not None for ci in cis):
            L.append(f"- Gap's 95% paired-bootstrap interval over {images} reaches −1 point or above in "
                     f"{sum(ci[1] >= -0.01 for ci in cis)} of {len(cis)} cells; it excludes 0 in "
                     f"{sum(ci[1] < 0 for ci in cis)} (`paired_bootstrap`: the {images} drawn, for these "
                     "trained students; not the bias of picking the hindsight best on the same images).")
    summ = res.get("fixed_policy_summary", {})
    if summ:
        cols = sorted({n for v in summ.values() for n in v["fixed_mean"]})
        L += ["", "## One fixed policy for every target (hindsight, largest size that fits)", "",
              f"Mean {col} accuracy over targets; each policy at its largest keep size within the budget.", "",
              "| budget | auto (mean) | best fixed policy (mean) | " + " | ".join(cols) + " |",
              "|---|---|---|" + "---|" * len(cols)]
        for b, v in summ.items():
            best = f"{v['best_fixed']} ({pct(v['fixed_mean'][v['best_fixed']])})" if v["best_fixed"] else "–"
            cells = [pct(v["fixed_mean"][n]) if n in v["fixed_mean"] else "–" for n in cols]
            L.append(f"| {int(b):,} B | {pct(v['auto_mean'])} | {best} | " + " | ".join(cells) + " |")
    L += ["", "## Every candidate", ""]
    for t, r in res["targets"].items():
        for b, c in r["budgets"].items():
            if "error" in c:
                continue
            L += [f"**{t}, {int(b):,} B**", "",
                  f"| candidate | k | bytes | classes | forecast (proxy seeds) | {col} (seeds) |",
                  "|---|---|---|---|---|---|"]
            for row in c["candidates"]:
                mark = " **(auto)**" if row["chosen"] else ""
                fc = "– (full teacher, not a candidate)" if row["forecast"] is None else \
                    f"{pct(row['forecast'])} ({row['forecast_seeds']})"
                L.append(f"| {row['name']}{mark} | {row['k']:,} | {row['bytes']:,} | {row['classes_kept']} | "
                         f"{fc} | {pct(row['test_accuracy'])} ({row['test_seeds']}) |")
            L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    paper.write_keeping_discussion(path, L)


def markdown_from(results: Path, out_dir: Path) -> Path:
    """Rewrite a run's markdown from its results JSON (e.g. after a wording fix), keeping the hand-written
    discussion: benchmarks/reports/<STEM upper-cased>.md, in the run's own order (the JSON has sorted keys)."""
    res = in_run_order(json.loads(results.read_text()))
    path = out_dir / paper.REPORTS / report_name(results.stem)
    write_markdown(res, path)
    return path


def in_run_order(res: dict) -> dict:
    """Targets and budgets in the run's own order (a saved JSON has sorted keys: 1,000, 20,000, 5,000 B)."""
    order = [str(b) for b in res["config"]["budgets"]]
    res["targets"] = {t: res["targets"][t] for t in res["config"]["targets"] if t in res["targets"]}
    for r in res["targets"].values():
        r["budgets"] = {b: r["budgets"][b] for b in order if b in r["budgets"]}
    res["fixed_policy_summary"] = {b: res["fixed_policy_summary"][b] for b in order
                                   if b in res.get("fixed_policy_summary", {})}
    return res


def report_name(stem: str) -> str:
    """The report of results/<stem>.json: AUTO_POLICY<VARIANT>[_quick][_val].md (e.g. auto_policy_quick_seed1_val
    -> AUTO_POLICY_SEED1_quick_val.md); any other stem upper-cased, a `_quick` ending kept in lower case."""
    val = stem.endswith(VAL_SUFFIX)
    base = stem[:-len(VAL_SUFFIX)] if val else stem
    quick = base.startswith("auto_policy_quick") or base.endswith("_quick")
    if base.startswith("auto_policy_quick"):
        base = "auto_policy" + base[len("auto_policy_quick"):]
    elif quick:
        base = base[:-len("_quick")]
    return base.upper() + ("_quick" if quick else "") + (VAL_SUFFIX if val else "") + ".md"


def merge(paths: list[Path], out: Path, stem: str, eval_split: str, quick: bool) -> int:
    """One results file and report from per-target runs of one setting (`paper.merge_runs`): same config but
    for the targets, same pool; their eval split and --quick must be the merge's flags, which name the files."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        print(f"benchmark: error: no results file {missing[0]}", file=sys.stderr)
        return 2
    res = paper.merge_runs(paths, lambda r: {k: v for k, v in r["config"].items() if k != "targets"})
    if res is None:
        return 2
    ran = res["config"].get("eval_split", "test")
    if ran != eval_split or any(("--quick" in c.split()) != quick for c in res["command"].split(" && ")):
        print(f"benchmark: error: merge these runs with the flags they ran with (--eval-split {ran}"
              + (", --quick" if "--quick" in res["command"].split() else "") + ")", file=sys.stderr)
        return 2
    print(f"wrote {write_all(in_run_order(res), out, stem)} and docs from {len(paths)} runs")
    return 0


def write_all(res: dict, out: Path, stem: str) -> Path:
    """results/<stem>.json, the fixed-policy summary added, and its report (`report_name`)."""
    res["fixed_policy_summary"] = fixed_policy_summary(res)
    path = paper.save_results(res, out, stem)
    write_markdown(res, out / paper.REPORTS / report_name(stem))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.auto_policy", description=__doc__.split("\n\n")[0])
    paper.add_common_args(ap)
    ap.add_argument("--budgets", nargs="+", type=int, default=None, help="byte budgets (default 1000 5000 20000)")
    ap.add_argument("--eval-seeds", nargs="+", type=int, default=None, help="student seeds (default 0 1 2)")
    ap.add_argument("--deciders", type=int, default=None,
                    help="deciding teachers when the teacher used all of train, each without its own slice "
                         f"(default {auto.DECIDERS}); a given value names the output")
    ap.add_argument("--holdout-fraction", type=float, default=None,
                    help="slice of train each deciding teacher goes without (default 0.2); "
                         "a given value names the output")
    ap.add_argument("--fractions", nargs="+", type=float, default=None,
                    help="keep sizes tried, as shares of the largest that fits (default "
                         f"{' '.join(f'{f:g}' for f in auto.DEFAULT_FRACTIONS)}); a given value names the output by "
                         "its smallest share, e.g. _ladder4 for ... 0.25")
    ap.add_argument("--search-seed", type=int, default=None,
                    help="seed of held-out slice, folds and proxies (default 0); a given value names the output")
    ap.add_argument("--no-holdout-groups", action="store_true",
                    help="fold by image, not by object (GTSRB tracks are held out as whole groups by default)")
    ap.add_argument("--eval-split", choices=EVAL_SPLITS, default="test",
                    help="where candidates are measured: the test split (default), or validation rows carved from "
                         "train (the test split unread; outputs named _val): the split to tune defaults on")
    ap.add_argument("--markdown-from", type=Path, default=None, metavar="RESULTS_JSON",
                    help="run nothing: rewrite that run's benchmarks/reports/*.md from its JSON (its discussion kept)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="run nothing: combine per-target runs (their results JSON; same settings and pool) into one "
                         "results file and report, named as a run with these flags would be")
    a = ap.parse_args(argv)
    if a.markdown_from is not None:
        if not a.markdown_from.is_file():
            print(f"benchmark: error: no results file {a.markdown_from}", file=sys.stderr)
            return 2
        print(f"wrote {markdown_from(a.markdown_from, Path(a.out_dir))}")
        return 0
    cfg = paper.apply_common_args(AutoConfig(), a, quick_config)
    if a.budgets:
        cfg.budgets = tuple(a.budgets)
    if a.eval_seeds:
        cfg.eval_seeds = tuple(a.eval_seeds)
    if a.deciders:
        cfg.deciders = a.deciders
    if a.fractions:
        cfg.fractions = tuple(a.fractions)
    if a.no_holdout_groups:
        cfg.holdout_groups = {}
    if a.holdout_fraction is not None:
        cfg.holdout_fraction = a.holdout_fraction
    if a.search_seed is not None:
        cfg.search_seed = a.search_seed
    try:  # a bad combination fails now, not after the first teacher
        auto.decider_plan(cfg.deciders, cfg.holdout_fraction)
    except PladaError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return 2
    cfg.eval_split = a.eval_split
    out = Path(a.out_dir)
    variant = (f"_deciders{a.deciders}" if a.deciders else "") + (
        f"_ladder{round(1 / min(a.fractions))}" if a.fractions else "") + (
        f"_holdout{round(100 * a.holdout_fraction)}" if a.holdout_fraction is not None else "") + (
        f"_seed{a.search_seed}" if a.search_seed is not None else "")
    stem = ("auto_policy_quick" if a.quick else "auto_policy") + variant + (
        VAL_SUFFIX if a.eval_split == "validation" else "")
    if a.merge:
        return merge(a.merge, out, stem, a.eval_split, a.quick)
    res = paper.run_all("auto_policy", cfg, a, run_target,
                        extra_flags=(("--budgets", a.budgets), ("--eval-seeds", a.eval_seeds),
                                     ("--deciders", a.deciders), ("--fractions", a.fractions),
                                     ("--no-holdout-groups", a.no_holdout_groups or None),
                                     ("--holdout-fraction", None if a.holdout_fraction is None
                                      else str(a.holdout_fraction)),
                                     ("--search-seed", None if a.search_seed is None else str(a.search_seed)),
                                     ("--eval-split", None if a.eval_split == "test" else a.eval_split)))
    if res is None:
        return 2
    path = write_all(res, out, stem)
    print(f"wrote {path} and docs in {math.ceil(res['wall_seconds'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
