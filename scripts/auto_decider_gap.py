"""Why does the auto search miss on GTSRB? Split the forecast's error into its two possible causes.

    PYTHONPATH=. python scripts/auto_decider_gap.py --target gtsrb32 --budgets 1000 5000 20000
    # writes results/auto_decider_gap_gtsrb32.json

The forecast of a candidate rule is a proxy trained on a *deciding* (fold) teacher's selection and scored on
*held-out train* images; what is sent is the *full* teacher's selection, judged on the *test* split. Two
things differ, so for every candidate of a finished `benchmarks.auto_policy` cell this measures (linear
head, seed 0, as the forecast's first pass):

- forecast: deciders' selections, scored on their held-out folds (the search's number);
- decider test: the same deciders' selections, scored on the test split (mean over deciders);
- sender test: the full teacher's selection on the test split (what the benchmark's table reports).

If decider test ranks candidates like sender test, the held-out images are the problem (they are not like
the test split); if it ranks them like the forecast, the deciding teachers are (their selections are not
the sender's). Reads the cell's candidates from a --send teacher run
(results/auto_policy_teacher_folds3.json); needs that run's caches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import paper
from benchmarks.auto_policy import AutoConfig, relevance_key, split_features
from plada import auto, rate
from plada.data import cache_root
from plada.features import cached_features, feature_model, split_key
from plada.pipeline import cross_fit
from plada.score import score_pool
from plada.train import head_job, train_heads


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), for Spearman's correlation without scipy."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="gtsrb32")
    ap.add_argument("--budgets", nargs="+", type=int, default=[5000, 20000])
    ap.add_argument("--results", default="results/auto_policy_teacher_folds3.json",
                    help="the auto_policy run to explain: one that sent the full teacher's selection (--send teacher)")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None, help="default: results/auto_decider_gap_<target>.json")
    a = ap.parse_args(argv)
    a.out = a.out or f"results/auto_decider_gap_{a.target}.json"
    t0 = time.time()
    res = json.loads(Path(a.results).read_text())
    cfg = AutoConfig()
    for k, v in res["config"].items():  # the run's own configuration (folds, seeds, limits, groups)
        if hasattr(cfg, k):
            setattr(cfg, k, tuple(v) if isinstance(getattr(cfg, k), tuple) else v)
    cfg.holdout_groups = res["config"].get("holdout_groups", {})  # runs before grouped folds had none
    cfg.send = res["config"].get("send", "teacher")  # runs before --send sent the full teacher's selection
    if cfg.send != "teacher":
        print(f"{a.results} sent deciders' own selections; this script explains a --send teacher run", file=sys.stderr)
        return 2
    pool = paper.get_pool(cfg.pool, a.data)
    src, train, test, tcfg, teacher, _ = paper.target_teacher(a.target, cfg, a.data)
    n_cls = len(train.class_names)
    if len(train.subset_indices(tcfg.limit, tcfg.seed)) != len(train):
        print("this script explains cross-fitted targets (teacher on all of train)", file=sys.stderr)
        return 2
    pattern = cfg.holdout_groups.get(a.target)
    tgroups = auto.name_groups(train.files, pattern) if pattern else None
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")

    def ref_key(idx: np.ndarray) -> np.ndarray:
        return relevance_key(fm, train, src.root, pool_f, idx, cfg)

    n_dec, frac = auto.decider_plan(cfg.folds, cfg.deciders, cfg.holdout_fraction, tgroups is not None)
    held, deciders, _ = cross_fit(train, pool, tcfg, n_dec, cfg.search_seed, ref_key, held_limit=cfg.heldout_limit,
                                  groups=tgroups, progress=False, holdout_fraction=frac)
    held_f = split_features(fm, train, src.root, held, "auto-heldout")
    held_y = train.labels[held]
    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, "test", len(test))))
    scores = score_pool(teacher, pool, cache_root() / "scores")
    full = auto.Decider(scores.labels, scores.energy(), scores.entropy(), np.arange(0), rate.confidence(scores.logits),
                        ref_key(np.arange(len(train))))
    gid = pool.groups()[0]
    out: dict = {"command": "python scripts/auto_decider_gap.py " + " ".join(argv or sys.argv[1:]),
                 "target": a.target, "group_pattern": pattern, "results": a.results, "cells": {}}
    for budget in a.budgets:
        rows = res["targets"][a.target]["budgets"][str(budget)]["candidates"]
        jobs, where = [], []
        for i, row in enumerate(rows):
            pol = auto.Policy(row["policy"], row["safety_share"], row["alpha"], row["tau"])
            for j, d in enumerate([*deciders, full]):
                sel = auto.select_policy(pol, row["k"], labels=d.labels, energy=d.energy, entropy=d.entropy,
                                         n_classes=n_cls, seed=cfg.search_seed, nearest_key=d.nearest_key,
                                         groups=gid, confidence=d.confidence)
                if len(sel.indices):
                    jobs.append(head_job(pool_f, sel.indices, sel.labels, n_cls, cfg.proxy_steps, cfg.search_seed))
                    where.append((i, j))
        heads = train_heads(jobs)
        fc = np.zeros(len(rows))
        fold_fc = np.zeros((len(rows), len(deciders)))  # each decider's own forecast, on its fold only
        dtest = np.zeros((len(rows), len(deciders)))
        stest = np.zeros(len(rows))
        for (i, j), (w, b) in zip(where, heads, strict=True):
            t_acc = float(((test_f @ w.T + b).argmax(1) == test.labels).mean())
            if j == len(deciders):
                stest[i] = t_acc
                continue
            r = deciders[j].rows
            hit = int(((held_f[r] @ w.T + b).argmax(1) == held_y[r]).sum())
            fc[i] += hit / len(held)
            fold_fc[i, j] = hit / len(r)
            dtest[i, j] = t_acc
        dmean = dtest.mean(1)
        single = [i for i, r in enumerate(rows) if r["forecast_seeds"] == 1]
        if any(abs(fc[i] - rows[i]["forecast"]) > 1e-12 for i in single):  # the same proxies as the search's
            print(f"{budget} B: forecasts differ from {a.results}'s; were its caches changed?", file=sys.stderr)
            return 2
        pick = {name: int(np.argmax(v)) for name, v in (("forecast", fc), ("decider_test", dmean),
                                                       ("sender_test", stest))}
        # A what-if, in-sample: send one decider's own selection (the (decider, rule) with the best forecast on
        # its own fold) instead of the full teacher's, so the forecast is of the very selection sent.
        ci, cj = np.unravel_index(int(np.argmax(fold_fc)), fold_fc.shape)
        cell = {
            "send_a_decider": {"candidate": f"{rows[ci]['name']} k={rows[ci]['k']}", "decider": int(cj),
                               "fold_forecast": float(fold_fc[ci, cj]), "test_seed0": float(dtest[ci, cj]),
                               "best_decider_test_seed0": float(dtest.max())},
            "candidates": [{"name": r["name"], "k": r["k"], "forecast_seed0": float(fc[i]),
                            "fold_forecasts": fold_fc[i].tolist(),
                            "decider_test": float(dmean[i]), "decider_test_each": dtest[i].tolist(),
                            "sender_test_seed0": float(stest[i])} for i, r in enumerate(rows)],
            "spearman": {"forecast~sender_test": spearman(fc, stest),
                         "decider_test~sender_test": spearman(dmean, stest),
                         "forecast~decider_test": spearman(fc, dmean)},
            "picks": {name: {"candidate": f"{rows[i]['name']} k={rows[i]['k']}", "sender_test_seed0": float(stest[i])}
                      for name, i in pick.items()},
        }
        out["cells"][str(budget)] = cell
        print(f"{a.target} {budget} B: Spearman forecast~sender test {cell['spearman']['forecast~sender_test']:.2f}, "
              f"decider test~sender test {cell['spearman']['decider_test~sender_test']:.2f}, "
              f"forecast~decider test {cell['spearman']['forecast~decider_test']:.2f}")
        for name, p in cell["picks"].items():
            print(f"  best by {name}: {p['candidate']} -> sender test {100 * p['sender_test_seed0']:.1f}%")
        sd = cell["send_a_decider"]
        print(f"  what-if, send decider {sd['decider']}'s {sd['candidate']}: fold forecast "
              f"{100 * sd['fold_forecast']:.1f}%, test {100 * sd['test_seed0']:.1f}% "
              f"(best decider selection on test {100 * sd['best_decider_test_seed0']:.1f}%)")
    out["seconds"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {a.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
