"""Does the sender's automatic policy choice (plada.auto) match the best fixed policy chosen in hindsight?

    python -m benchmarks.auto_policy            # results/auto_policy.json, docs/AUTO_POLICY.md
    python -m benchmarks.auto_policy --quick    # small subset (also run by the test suite)

Same pool, teachers, pool scores and frozen features as benchmarks.paper (its Config, caches and
teacher recipe are reused, so a finished paper run makes this one cheap). Per target and byte budget
(about 1, 5 and 20 KB): held-out = target train images the teacher did not train on; when the teacher
used all of train, exactly what `plada send --budget` does: a second teacher is fine-tuned on the other
90%, the search decides with its pool scores, and every candidate is re-applied to the full teacher's
scores (`auto.reselect`) before it is measured. The auto search picks a policy and keep size by the
held-out accuracy of a proxy linear head; then every candidate of that search is measured on the test
split with the paper's linear student (seed 0 for all; the leaders within `eval_band` of the best get
the other `eval_seeds` too, and their accuracy is the mean), which gives the auto choice's accuracy,
the best candidate in hindsight, and the forecast error.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks import paper
from plada import auto, rate
from plada.data import Split, cache_root
from plada.errors import PladaError
from plada.features import cached_features, feature_model, split_key
from plada.pool import Pool
from plada.score import score_pool
from plada.teacher import train_teacher
from plada.train import accuracy, train_head

BUDGETS = (1000, 5000, 20000)


@dataclass
class AutoConfig(paper.Config):
    budgets: tuple[int, ...] = BUDGETS
    heldout_limit: int = 5000  # held-out images scored by the proxy (a seeded subsample when more are unseen)
    heldout_frac: float = 0.1  # slice held out when the teacher trained on all of train
    relevance_limit: int = 5000  # target train images the nearest-target policy compares the pool with
    proxy_steps: int = auto.PROXY_STEPS  # head steps of each proxy student in the search
    eval_seeds: tuple[int, ...] = (0, 1, 2)  # linear-student seeds on the test split (the first for all candidates)
    eval_band: float = 0.02  # candidates within this of the best first-seed accuracy get every eval seed
    search_seed: int = 0


def quick_config(cfg: AutoConfig) -> AutoConfig:
    """paper.quick_config (so quick teachers and features are shared) plus a smaller search."""
    cfg = paper.quick_config(cfg)
    cfg.heldout_limit, cfg.relevance_limit, cfg.proxy_steps = 300, 300, 100
    cfg.eval_seeds = (0, 1)
    return cfg


def subsample(idx: np.ndarray, limit: int, seed: int) -> np.ndarray:
    if len(idx) <= limit:
        return idx
    return np.sort(np.random.default_rng(seed).permutation(idx)[:limit])


def split_features(fm, train: Split, src_root: Path, idx: np.ndarray, what: str) -> np.ndarray:
    """Features of some train rows, cached under a key naming exactly those rows."""
    digest = hashlib.sha256(np.ascontiguousarray(idx, dtype=np.int64).tobytes()).hexdigest()[:16]
    key = f"{split_key(src_root, 'train', len(train))}/{what}/{digest}"
    return np.asarray(cached_features(fm, np.asarray(train.images[idx]), key, progress=False))


def run_target(target: str, pool: Pool, cfg: AutoConfig, data: str | None, log) -> dict:
    t0 = time.time()
    src, train, test, tcfg, teacher, tinfo = paper.target_teacher(target, cfg, data)
    n_cls = len(train.class_names)
    log(f"[{target}] teacher {cfg.teacher}: test accuracy {tinfo['test_accuracy']:.4f}")
    seen = train.subset_indices(tcfg.limit, tcfg.seed)
    unseen = np.setdiff1d(np.arange(len(train)), seen)
    refit = len(unseen) == 0
    scores = score_pool(teacher, pool, cache_root() / "scores")  # the teacher whose labels are sent
    decide = scores  # the teacher whose scores the search decides with
    if refit:  # as plada send: decide with a teacher that never saw the held-out slice
        rest, held = auto.holdout_split(len(train), cfg.heldout_frac, seed=cfg.search_seed, limit=cfg.heldout_limit)
        t_dec, dinfo = train_teacher(train.take(rest), None, replace(tcfg, limit=None), cache_root() / "teachers")
        decide = score_pool(t_dec, pool, cache_root() / "scores")
        note = (f"the teacher trained on all {len(train)} train images, so (as `plada send` does) a second teacher "
                f"fine-tuned on the other {len(rest)} decided, scored on a seeded {cfg.heldout_frac:.0%} slice "
                f"({len(held)} images) it never saw; each candidate was then re-applied to the full teacher's "
                "scores and measured as sent")
        log(f"[{target}] deciding teacher on {len(rest)} images ({dinfo['train_seconds']} s)")
    else:
        rest, held = seen, subsample(unseen, cfg.heldout_limit, cfg.search_seed)
        note = f"{len(held)} of the {len(unseen)} train images the teacher never saw"
    ref = subsample(rest, cfg.relevance_limit, cfg.search_seed + 1)
    log(f"[{target}] held-out: {note}; nearest-target compares with {len(ref)} teacher-train images")

    gid = pool.groups()[0]
    sent_by = {"labels": scores.labels, "energy": scores.energy(), "entropy": scores.entropy(),
               "confidence": rate.confidence(scores.logits)}
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, "test", len(test))))
    held_f = split_features(fm, train, src.root, held, "auto-heldout")
    ref_f = split_features(fm, train, src.root, ref, "auto-relevance")
    t1 = time.time()
    nearest = auto.nearest_target_key(pool_f, ref_f)
    nearest_s = round(time.time() - t1, 1)
    log(f"[{target}] nearest-target key over {len(pool)} pool images: {nearest_s} s")

    base_meta = {"target": src.name, "keep": None, "temperature": 1.0,
                 "teacher": {"model": tcfg.model, "res": tcfg.res, "mode": tcfg.mode,
                             "test_accuracy": tinfo.get("test_accuracy")}}
    size_of = auto.payload_sizer(pool.fingerprint, len(pool), train.class_names, base_meta, groups=gid)
    measured: dict[tuple[bytes, int], float] = {}

    def as_sent(ch: auto.AutoChoice, row: dict) -> auto.AutoChoice:
        """The candidate as `plada send` would write it: re-applied to the full teacher when that differs."""
        cand = replace(ch, name=row["name"], policy=row["policy"], safety_share=row["safety_share"],
                       alpha=row["alpha"], tau=row["tau"], k=row["k"], forecast=row["forecast"])
        if not refit:
            idx, sent = auto.select_policy(cand.rule, row["k"], labels=scores.labels, energy=sent_by["energy"],
                                           entropy=sent_by["entropy"], n_classes=n_cls, seed=cfg.search_seed,
                                           nearest_key=nearest, groups=gid, confidence=sent_by["confidence"])
            return replace(cand, indices=idx, labels=sent, payload_bytes=row["bytes"])
        return auto.reselect(cand, labels=sent_by["labels"], energy=sent_by["energy"], entropy=sent_by["entropy"],
                             n_classes=n_cls, size_of=size_of, nearest_key=nearest, groups=gid,
                             confidence=sent_by["confidence"])

    def test_accuracy(sel: auto.AutoChoice, seeds: tuple[int, ...]) -> float:
        digest = hashlib.sha256(sel.indices.tobytes() + sel.labels.tobytes()).digest()
        for s in seeds:
            if (digest, s) not in measured:
                with auto.torch_threads(1):
                    w, b = train_head(np.asarray(pool_f[sel.indices]), sel.labels, n_cls, steps=cfg.head_steps,
                                      seed=s)
                measured[digest, s] = accuracy(test_f @ w.T + b, test.labels)
        return float(np.mean([measured[digest, s] for s in seeds]))

    cells: dict[str, dict] = {}
    for budget in cfg.budgets:
        t1 = time.time()
        try:
            ch = auto.search(labels=decide.labels, energy=decide.energy(), entropy=decide.entropy(),
                             pool_feats=pool_f, heldout_feats=held_f, heldout_labels=train.labels[held],
                             n_classes=n_cls, size_of=size_of, budget_bytes=int(budget), nearest_key=nearest,
                             groups=gid, confidence=rate.confidence(decide.logits), head_steps=cfg.proxy_steps,
                             seed=cfg.search_seed)
        except PladaError as e:
            cells[str(budget)] = {"error": str(e)}
            log(f"[{target}] {budget} B: {e}")
            continue
        search_s = round(time.time() - t1, 1)
        rows = ch.candidates
        sels = []
        for row in rows:
            try:
                sels.append(as_sent(ch, row))
            except PladaError as e:  # the full teacher's selection for this rule keeps nothing in the budget
                sels.append(None)
                row["error"] = str(e)
                continue
            row["sent_k"], row["sent_kept"], row["sent_bytes"] = sels[-1].k, len(sels[-1].indices), \
                sels[-1].payload_bytes
            row["sent_classes"] = int(len(np.unique(sels[-1].labels)))
            row["test_accuracy"], row["test_seeds"] = test_accuracy(sels[-1], cfg.eval_seeds[:1]), 1
        lead = max(r["test_accuracy"] for r in rows if "test_accuracy" in r)
        for row, sel in zip(rows, sels, strict=True):
            if sel is not None and (row["chosen"] or row["test_accuracy"] >= lead - cfg.eval_band):
                row["test_accuracy"], row["test_seeds"] = test_accuracy(sel, cfg.eval_seeds), len(cfg.eval_seeds)
        rows_ok = [r for r in rows if "test_accuracy" in r]
        chosen = next(r for r in rows if r["chosen"])
        if "error" in chosen:
            cells[str(budget)] = {"error": f"the chosen policy fails on the full teacher: {chosen['error']}"}
            continue
        best = max(rows_ok, key=lambda r: (r["test_accuracy"], -r["sent_bytes"]))
        tops: dict[str, dict] = {}
        for r in rows_ok:  # each policy at its largest affordable size
            if r["k"] > tops.get(r["name"], {"k": 0})["k"]:
                tops[r["name"]] = r
        pick = ("name", "policy", "safety_share", "alpha", "k", "bytes", "forecast", "test_accuracy", "test_seeds",
                "classes_kept", "sent_k", "sent_kept", "sent_bytes", "sent_classes")
        cells[str(budget)] = {
            "auto": {**{k: v for k, v in ch.summary().items() if k != "candidates"},
                     **{k: chosen[k] for k in pick if k.startswith(("sent_", "test_", "classes_"))}},
            "hindsight": {k: best[k] for k in pick},
            "default": {k: tops["lowest-energy"][k] for k in pick} if "lowest-energy" in tops else None,
            "largest": {name: r["test_accuracy"] for name, r in tops.items()},
            "gap": chosen["test_accuracy"] - best["test_accuracy"],
            "forecast_error": ch.forecast - chosen["test_accuracy"],
            "search_seconds": search_s,
            "candidates": rows,
        }
        log(f"[{target}] {budget} B: auto {ch.name} k={chosen['sent_k']} ({chosen['sent_bytes']} B) forecast "
            f"{ch.forecast:.4f} "
            f"test {chosen['test_accuracy']:.4f}; hindsight {best['name']} k={best['k']} {best['test_accuracy']:.4f} "
            f"(search {search_s} s)")
    return {
        "target": target, "classes": n_cls, "train_images": len(train), "test_images": len(test),
        "teacher": {"model": cfg.teacher, "res": cfg.teacher_res, "accuracy": tinfo["test_accuracy"],
                    "train_images": len(seen)},
        "heldout": {"images": len(held), "refit": refit, "note": note},
        "relevance_images": len(ref), "nearest_key_seconds": nearest_s,
        "pseudo_label_hist": np.bincount(scores.labels, minlength=n_cls).tolist(),
        "budgets": cells, "seconds": round(time.time() - t0, 1),
    }


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


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def write_markdown(res: dict, path: Path) -> None:
    cfg = res["config"]
    L = ["# Auto policy: the sender picks the selection for a byte budget", "",
         f"Command: `{res['command']}` — wall time {res['wall_seconds'] / 60:.1f} min on {res['machine']}.", "",
         f"Pool: `{cfg['pool']}` ({res['pool_size']:,} images); teachers, pool scores and features as in "
         "`benchmarks.paper`. For each target and byte budget, `plada.auto.search` tries every candidate policy "
         "(lowest / highest energy, lowest entropy, random, nearest-to-target, Safety-Net s ∈ {0.1, 0.3} × "
         "α ∈ {0.5, −0.2}, whole pool folders by mean energy with the teacher's labels (tau=0) or each folder's "
         "majority label (tau=1)) at the largest keep size whose real `.plada` file (context codec, the pool's "
         "folders as groups, as `plada send` writes it) fits the budget and at ½ and ¼ of it, "
         f"trains a proxy linear head ({cfg['proxy_steps']} steps) per candidate and picks the best held-out "
         "accuracy (the *forecast*). Every candidate is then measured on the test split with the paper's linear "
         f"student ({cfg['head_steps']} steps; seed {cfg['eval_seeds'][0]} for every candidate, then the mean over "
         f"seeds {list(cfg['eval_seeds'])} for the auto choice and every candidate within "
         f"{100 * cfg['eval_band']:g} points of the best first-seed accuracy): *hindsight* is the best of them, "
         "*gap* = auto − hindsight, *forecast error* = forecast − auto's test accuracy, *default* = lowest energy "
         "at the largest size that fits. Where the teacher trained on all of train, the search decides with a "
         "teacher fine-tuned on 90% and each candidate is re-applied to the full teacher before it is measured, "
         "as `plada send` does; k and bytes are then those of the payload sent. The search re-forecasts its "
         f"finalists (within 2 points of the best proxy) over 3 proxy seeds. Accuracies in %.", "",
         "| target | budget | auto choice (k, bytes) | forecast | auto test | forecast error | hindsight best (k) | "
         "hindsight test | gap | default test | search s |",
         "|---|---|---|---|---|---|---|---|---|---|---|"]
    gaps, errs = [], []
    for t, r in res["targets"].items():
        for b, c in r["budgets"].items():
            if "error" in c:
                L.append(f"| {t} | {int(b):,} B | error: {c['error']} |  |  |  |  |  |  |  |  |")
                continue
            a, h, d = c["auto"], c["hindsight"], c["default"]
            gaps.append(c["gap"])
            errs.append(c["forecast_error"])
            L.append(f"| {t} | {int(b):,} B | {a['name']} ({a['sent_k']:,}, {a['sent_bytes']:,} B) | "
                     f"{pct(a['forecast'])} | {pct(a['test_accuracy'])} | {pts(c['forecast_error'])} | "
                     f"{h['name']} ({h['sent_k']:,}) | "
                     f"{pct(h['test_accuracy'])} | {pts(c['gap'])} | {pct(d['test_accuracy']) if d else '–'} | "
                     f"{c['search_seconds']} |")
    L += ["", "Held-out images per target:", ""]
    L += [f"- **{t}**: {r['heldout']['note']}." for t, r in res["targets"].items()]
    if gaps:
        within = sum(g >= -0.01 for g in gaps)
        close = sum(abs(e) <= 0.05 for e in errs)
        L += ["", "## Against the goals", "",
              f"- Auto within 1 point of the hindsight best: {within} of {len(gaps)} cells (worst gap "
              f"{pts(min(gaps))} points).",
              f"- Forecast within 5 points of the measured accuracy: {close} of {len(errs)} cells (largest error "
              f"{pts(max(errs, key=abs))} points).",
              "- Hindsight picks the best of all candidates on the test split itself, so it is an optimistic "
              "bound (its maximum also rides on what evaluation noise the seed mean leaves)."]
    summ = res.get("fixed_policy_summary", {})
    if summ:
        cols = sorted({n for v in summ.values() for n in v["fixed_mean"]})
        L += ["", "## One fixed policy for every target (hindsight, largest size that fits)", "",
              "Mean test accuracy over targets; each policy at its largest keep size within the budget.", "",
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
                  "| candidate | k | bytes | classes | forecast (proxy seeds) | k sent | bytes sent | test (seeds) |",
                  "|---|---|---|---|---|---|---|---|"]
            for row in c["candidates"]:
                mark = " **(auto)**" if row["chosen"] else ""
                test = (f"{pct(row['test_accuracy'])} ({row['test_seeds']})" if "test_accuracy" in row
                        else f"error: {row.get('error')}")
                L.append(f"| {row['name']}{mark} | {row['k']:,} | {row['bytes']:,} | {row['classes_kept']} | "
                         f"{pct(row['forecast'])} ({row['forecast_seeds']}) | {row.get('sent_k', 0):,} | "
                         f"{row.get('sent_bytes', 0):,} | {test} |")
            L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    paper.write_keeping_discussion(path, L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.auto_policy", description=__doc__.split("\n\n")[0])
    paper.add_common_args(ap)
    ap.add_argument("--budgets", nargs="+", type=int, default=None, help="byte budgets (default 1000 5000 20000)")
    ap.add_argument("--eval-seeds", nargs="+", type=int, default=None, help="test-split student seeds (default 0 1 2)")
    a = ap.parse_args(argv)
    cfg = paper.apply_common_args(AutoConfig(), a, quick_config)
    if a.budgets:
        cfg.budgets = tuple(a.budgets)
    if a.eval_seeds:
        cfg.eval_seeds = tuple(a.eval_seeds)
    out = Path(a.out_dir)
    stem = "auto_policy_quick" if a.quick else "auto_policy"
    res = paper.run_all("auto_policy", cfg, a, run_target,
                        extra_flags=(("--budgets", a.budgets), ("--eval-seeds", a.eval_seeds)))
    if res is None:
        return 2
    res["fixed_policy_summary"] = fixed_policy_summary(res)
    path = paper.save_results(res, out, stem)
    write_markdown(res, out / "docs" / ("AUTO_POLICY.md" if not a.quick else "AUTO_POLICY_quick.md"))
    print(f"wrote {path} and docs in {math.ceil(res['wall_seconds'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
