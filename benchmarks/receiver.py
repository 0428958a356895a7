"""Receiver modes against payload bytes: does using the whole pool the receiver holds buy accuracy per byte?

    python -m benchmarks.receiver            # results/receiver.json, benchmarks/reports/RECEIVER.md, plots
    python -m benchmarks.receiver --quick    # tiny data, seconds (also run by the test suite)

Same pool, teachers, pool scores and frozen features as benchmarks.paper (its Config and caches are
reused). Per target, payloads of about 0.5 to 20 KB are the lowest-energy selections of the full
teacher, each the largest keep count whose real `.plada` file (header naming the receiver mode
included) fits the byte target. Each is received by every receiver mode (plada.receiver) with the
paper benchmark's linear student (frozen EfficientNet-Lite0 features + softmax head), mean over seeds;
the fine-tuned student runs at a few sizes for plain and the best pool mode.

Validation (the receiver's constants): on target *train* images (never the test split), at a few
sizes, seed 0, a small grid of each pool mode's knobs; the report lists every cell. The test
accuracies are measured with plada.receiver's constants as they stand, so a changed constant shows.
Reference points: the paper policy (lowest energy, highest for the far-OOD target, gap/bitmap +
Zstd-19, plain receiver; as in benchmarks.payload_rate) and the int8 linear head (benchmarks.paper).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import paper
from benchmarks.payload_rate import FAR_OOD, PAPER_CODECS
from plada import auto, payload, pipeline, receiver, select
from plada.data import cache_root
from plada.features import cached_features, feature_model, rows_features, split_key
from plada.pool import Pool
from plada.score import score_pool
from plada.student import StudentConfig, train_student
from plada.train import accuracy, predict, torch_threads, train_head

MODES = receiver.LABEL_MODES  # the modes a label payload serves (head: benchmarks.pool_head)
POOL_MODES = tuple(m for m in MODES if m != "plain")


@dataclass
class ReceiverConfig(paper.Config):
    byte_targets: tuple[int, ...] = (500, 1000, 2000, 5000, 10000, 20000)
    finetune_bytes: tuple[int, ...] = (1000, 5000)
    finetune_targets: tuple[str, ...] | None = None  # None: every target
    finetune_test_limit: int | None = 2000  # fine-tuned students are evaluated on this many test images
    paper_keeps: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 1.00)
    validate: bool = True
    val_bytes: tuple[int, ...] = (1000, 5000)
    val_limit: int = 5000  # validation: this many target train images
    grid_shares: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # pseudo-labelled share of the pool
    grid_rounds: tuple[int, ...] = (1, 2, 3)
    grid_k: tuple[int, ...] = (10, 20, 50)
    tolerance: float = 0.01
    workers: int = 2
    int8_from: str | None = "results/paper.json"  # the int8 head's bytes and accuracy (None: measure it)
    spread_covers: tuple[int, ...] = (5, 20)  # spread_order's neighbourhood sizes (a receiver-aware selection)
    spread_max_bytes: int = 5000  # spread selections are measured up to this payload size


def quick_config(cfg: ReceiverConfig) -> ReceiverConfig:
    cfg = paper.quick_config(cfg)
    cfg.byte_targets, cfg.finetune_bytes, cfg.val_bytes = (195, 205), (205,), (205,)  # a 320-image pool
    cfg.paper_keeps, cfg.grid_shares, cfg.grid_rounds, cfg.grid_k = (0.05, 0.25), (0.1,), (1, 2), (5,)
    cfg.finetune_test_limit, cfg.int8_from, cfg.val_limit = None, None, 1000
    return cfg


def largest_fitting(size_of, n: int, budget: int) -> tuple[int, int] | None:
    """(k, bytes) of the largest top-k that fits ``budget`` bytes; sizes grow with k, nearly monotonically."""
    if size_of(1) > budget:
        return None
    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size_of(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo, size_of(lo)


def heads(jobs: list, workers: int) -> list:
    """Run ``jobs`` (thunks returning anything) on ``workers`` threads of one torch thread each."""
    with torch_threads(1):
        if workers <= 1:
            return [j() for j in jobs]
        with ThreadPoolExecutor(workers) as ex:
            return list(ex.map(lambda j: j(), jobs))


def spread_order(labels: np.ndarray, key: np.ndarray, nbr: np.ndarray, cover: int) -> np.ndarray:
    """Pool rows in the order a receiver-aware sender would keep them: best key first, but an image whose
    same-label neighbourhood (its ``cover`` nearest in the receiver's kNN graph) already holds a kept seed
    waits until every uncovered one is kept. Why: a propagating receiver spreads each label to its
    neighbours, so a second seed next to the first buys little; seeds spread over each class's region do.
    Any prefix is the selection for that size (greedy, so sizes nest). Rows whose key is not finite (rows the
    pool lacks) come last."""
    rank = select.order(key)
    finite = np.isfinite(np.asarray(key, dtype=np.float64))
    covered = np.zeros(len(labels), dtype=bool)
    first, later = [], []
    nb = nbr[:, :cover]
    for i in rank[finite[rank]].tolist():
        if covered[i]:
            later.append(i)
            continue
        first.append(i)
        row = nb[i]
        covered[row[labels[row] == labels[i]]] = True
    last = rank[~finite[rank]].tolist()
    return np.asarray(first + later + last, dtype=np.int64)


def run_target(target: str, pool: Pool, cfg: ReceiverConfig, data: str | None, log) -> dict:
    t0 = time.time()
    src, train, test, tcfg, teacher, tinfo = paper.target_teacher(target, cfg, data)
    n_cls, names = len(train.class_names), tuple(train.class_names)
    scores = score_pool(teacher, pool, cache_root() / "scores", progress=False)
    plabels, energy = scores.labels, scores.energy()
    gid = pool.groups()[0]
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, "test", len(test))))
    val = train.subset(cfg.val_limit, seed=0)  # validation: target train images, never the test split
    val_f = np.asarray(cached_features(fm, val.images, split_key(src.root, "train", len(val))))
    val_y = val.labels
    gkey = receiver._content_key(pool_f)
    receiver.knn_graph(pool_f, receiver.KNN_MAX, gkey)  # once, cached: every propagate below reads it
    # the sender's forecast of each mode, as `plada send --set receiver=auto` makes it: target train images the
    # teacher never saw (else a sample of all of train), the proxy student, the receiver's own expansion
    _, unseen, _ = pipeline.unseen_rows(train, tcfg, None)
    held = auto.subsample(unseen if len(unseen) >= pipeline.MIN_UNSEEN else np.arange(len(train)), 5000, 0)
    held_f = rows_features(fm, train.images, held, split_key(src.root, "train", len(train)) + "/held")

    def expand_fn(mode: str, rows: np.ndarray, labels: np.ndarray) -> receiver.Expansion:
        return receiver.expand(mode, pool_f, rows, labels, n_cls, seed=0, allowed=~pool.missing, graph_key=gkey,
                               progress=False)

    def head_acc(exp: receiver.Expansion, seed: int, feats: np.ndarray, y: np.ndarray):
        def job() -> float:
            w, b = receiver.fit_head(pool_f, exp, n_cls, cfg.head_steps, seed)
            return accuracy(feats @ w.T + b, y)
        return job

    # payload sizes: the real file with a header naming the longest mode, so every mode's payload fits
    longest = max(MODES, key=len)
    sizer = auto.payload_sizer(pool.fingerprint, len(pool), names, longest, groups=gid)
    sel = {}

    highest = target in FAR_OOD  # the paper keeps the highest-energy images for a far out-of-distribution target
    key = -energy if highest else energy

    def le(k: int) -> np.ndarray:
        if k not in sel:
            sel[k] = select.select(plabels, key, k, n_cls)
        return sel[k]

    def size_k(k: int) -> int:
        return sizer(le(k), plabels[le(k)], None)

    nbr = receiver.knn_graph(pool_f, receiver.KNN_MAX, gkey, progress=False)[0]
    orders = {c: spread_order(plabels, np.where(pool.missing, np.inf, key), nbr, c) for c in cfg.spread_covers}

    def spread_sel(k: int, cover: int) -> np.ndarray:
        return np.sort(orders[cover][:k])

    def size_spread(k: int, cover: int) -> int:
        idx = spread_sel(k, cover)
        return sizer(idx, plabels[idx], None)

    sizes = {}
    for b in sorted(set(cfg.byte_targets) | set(cfg.val_bytes) | set(cfg.finetune_bytes)):
        fit = largest_fitting(size_k, len(pool), b)
        if fit is None:
            log(f"[{target}] {b} B: not even one kept image fits")
        else:
            sizes[b] = fit
    # ---- validation grid: target train images, seed 0 ----
    grid: list[dict] = []
    if cfg.validate:
        for b in cfg.val_bytes:
            if b not in sizes:
                continue
            k = sizes[b][0]
            idx, lab = le(k), plabels[le(k)]
            cells, jobs = [], []
            cells.append({"mode": "plain"})
            jobs.append(head_acc(receiver.expand("plain", pool_f, idx, lab, n_cls), 0, val_f, val_y))
            for share in cfg.grid_shares:
                m = int(round(share * len(pool)))
                for r in cfg.grid_rounds:
                    def st(m=m, r=r, idx=idx, lab=lab):
                        e = receiver.expand("selftrain", pool_f, idx, lab, n_cls, seed=0, pseudo=m, rounds=r,
                                            progress=False)
                        return head_acc(e, 0, val_f, val_y)()
                    cells.append({"mode": "selftrain", "share": share, "rounds": r})
                    jobs.append(st)
            for kk in cfg.grid_k:
                top = max(int(round(s * len(pool))) for s in cfg.grid_shares)
                pred, conf, ok, info = receiver.pool_labels("propagate", pool_f, idx, lab, n_cls, pseudo=top, k=kk,
                                                            graph_key=gkey, progress=False)
                for share in cfg.grid_shares:
                    for weighted in (False, True):
                        e = receiver.from_pool_labels(idx, lab, pred, conf, ok, int(round(share * len(pool))), n_cls,
                                                      weighted, info)
                        cells.append({"mode": "propagate", "share": share, "k": kk, "weighted": weighted})
                        jobs.append(head_acc(e, 0, val_f, val_y))
            accs = heads(jobs, cfg.workers)
            for c, a in zip(cells, accs, strict=True):
                grid.append({"bytes_target": b, "kept": k, **c, "val_accuracy": a})
            best = max((g for g in grid if g["bytes_target"] == b), key=lambda g: g["val_accuracy"])
            log(f"[{target}] validation {b} B: plain {accs[0]:.4f}, best {best}")
    # ---- test accuracy at every size, constants as in plada.receiver ----
    def measure(idx: np.ndarray, lab: np.ndarray) -> tuple[dict, dict]:
        """Each mode's test accuracy (mean over seeds) and the sender's forecast for one selection."""
        exps = {"plain": [receiver.expand("plain", pool_f, idx, lab, n_cls)] * len(cfg.seeds)}
        exps["selftrain"] = [receiver.expand("selftrain", pool_f, idx, lab, n_cls, seed=s, progress=False)
                             for s in cfg.seeds]
        prop = receiver.expand("propagate", pool_f, idx, lab, n_cls, graph_key=gkey, progress=False)
        exps["propagate"] = [prop] * len(cfg.seeds)  # deterministic: the seed only acts in the head
        jobs = [head_acc(exps[m][i], s, test_f, test.labels) for m in MODES for i, s in enumerate(cfg.seeds)]
        accs = heads(jobs, cfg.workers)
        modes = {}
        for j, m in enumerate(MODES):
            e = exps[m][0]
            extra = slice(len(idx), None)  # the pseudo-labelled rows: how often they agree with the teacher
            right = float((e.labels[extra] == plabels[e.indices[extra]]).mean()) if len(e.indices) > len(idx) else None
            modes[m] = {"accuracy": paper.mean_std(accs[j * len(cfg.seeds):(j + 1) * len(cfg.seeds)]),
                        "trained_on": int(len(e.indices)), "pseudo": e.info.get("pseudo", 0),
                        "agree_with_teacher": right}
        fc = auto.forecast_modes(pool_feats=pool_f, indices=idx, labels=lab, heldout_feats=held_f,
                                 heldout_labels=train.labels[held], n_classes=n_cls, modes=MODES,
                                 expand=expand_fn, seed=0)
        pick = max(MODES, key=lambda m: (fc[m], -MODES.index(m)))  # ties: plain, as the sender
        return modes, {"modes": fc, "choice": pick, "held_out": int(len(held)),
                       "held_out_unseen_by_teacher": bool(len(unseen) >= pipeline.MIN_UNSEEN)}

    points, spread_points = [], []
    for b in cfg.byte_targets:
        if b not in sizes:
            continue
        k, nbytes = sizes[b]
        modes, fc = measure(le(k), plabels[le(k)])
        points.append({"bytes_target": b, "kept": k, "bytes": nbytes, "modes": modes, "forecast": fc})
        log(f"[{target}] {b} B ({k} kept, {nbytes} B): " + ", ".join(
            f"{m} {v['accuracy']['mean']:.4f}" for m, v in modes.items()) + f"; forecast picks {fc['choice']}")
    # ---- a receiver-aware selection: seeds spread over the receiver's kNN graph (spread_order) ----
    for cover in cfg.spread_covers:
        for b in cfg.byte_targets:
            if b > cfg.spread_max_bytes:
                continue
            fit = largest_fitting(lambda k, c=cover: size_spread(k, c), len(pool), b)
            if fit is None:
                continue
            k, nbytes = fit
            idx = spread_sel(k, cover)
            modes, fc = measure(idx, plabels[idx])
            spread_points.append({"cover": cover, "bytes_target": b, "kept": k, "bytes": nbytes, "modes": modes,
                                  "forecast": fc})
            log(f"[{target}] spread cover {cover} {b} B ({k} kept, {nbytes} B): " + ", ".join(
                f"{m} {v['accuracy']['mean']:.4f}" for m, v in modes.items()) + f"; forecast picks {fc['choice']}")
    # ---- the paper policy with the plain receiver ----
    paper_pts = []
    for kp in cfg.paper_keeps:
        k = select.budget(len(pool), keep=kp)
        idx = select.select(plabels, -energy if highest else energy, k, n_cls)
        p = payload.Payload(pool.fingerprint, len(pool), names, idx, plabels[idx])
        e = receiver.Expansion(idx, plabels[idx], None, {"payload": len(idx)})
        accs = heads([head_acc(e, s, test_f, test.labels) for s in cfg.seeds], cfg.workers)
        paper_pts.append({"keep": kp, "kept": int(k), "bytes": len(payload.encode(p, groups=gid, codecs=PAPER_CODECS)),
                          "accuracy": paper.mean_std(accs)})
    best = max(paper_pts, key=lambda p: (p["accuracy"]["mean"], -p["bytes"]))
    whole = [(p["bytes"], m, p["modes"][m]["accuracy"]["mean"]) for p in points for m in POOL_MODES]
    reach = [w for w in whole if w[2] >= best["accuracy"]["mean"] - cfg.tolerance]
    cheapest = min(reach) if reach else None
    moon = {"ratio": cheapest[0] / best["bytes"] if cheapest else None, "paper_best": best,
            "cheapest": {"bytes": cheapest[0], "mode": cheapest[1], "accuracy": cheapest[2]} if cheapest else None,
            "best_whole_pool": max(({"bytes": w[0], "mode": w[1], "accuracy": w[2]} for w in whole),
                                   key=lambda w: w["accuracy"], default=None)}
    # ---- the int8 head: benchmarks.paper's table when it measured this target, else its recipe here ----
    known = json.loads(Path(cfg.int8_from).read_text()).get("targets", {}) if cfg.int8_from else {}
    if target in known:
        h = known[target]["baselines"]["int8-head"]
        head = {"bytes": int(h["bytes"]), "accuracy": float(h["accuracy"]), "from": cfg.int8_from}
    else:
        trn = train.subset(cfg.train_feature_limit, seed=0)
        train_f = np.asarray(cached_features(fm, trn.images, split_key(src.root, "train", len(trn))))
        w, b = train_head(train_f, trn.labels, n_cls, steps=cfg.head_steps, seed=0)
        hb, wq, bq = paper.int8_head(w, b)
        head = {"bytes": hb, "accuracy": accuracy(test_f @ wq.T + bq, test.labels), "from": "measured here"}
    hb = head["bytes"]
    fits = [(p["modes"][m]["accuracy"]["mean"], m, p["bytes"]) for p in points for m in MODES
            if p["bytes"] <= hb]
    top = max(fits) if fits else None
    head["plada_at_no_more_bytes"] = ({"accuracy": top[0], "mode": top[1], "bytes": top[2]} if top else None)
    # ---- fine-tuned students: plain and the best pool mode at a few sizes ----
    ft = []
    targets_ft = cfg.finetune_targets if cfg.finetune_targets is not None else cfg.targets
    if target in targets_ft:
        ft_test = test.subset(cfg.finetune_test_limit, seed=0) if cfg.finetune_test_limit else test
        gains = {m: np.mean([p["modes"][m]["accuracy"]["mean"] for p in points]) for m in POOL_MODES} if points else {}
        best_mode = max(gains, key=gains.get) if gains else POOL_MODES[0]
        for b in cfg.finetune_bytes:
            if b not in sizes:
                continue
            k = sizes[b][0]
            idx, lab = le(k), plabels[le(k)]
            for m in ("plain", best_mode):
                t1 = time.time()
                scfg = StudentConfig(model=cfg.student, res=cfg.student_res, mode="finetune",
                                     epochs=cfg.finetune_epochs, flip=tcfg.flip, seed=0)
                e = receiver.expand(m, pool_f, idx, lab, n_cls, graph_key=gkey, progress=False)
                e, scfg = receiver.student_recipe(e, scfg, m, k, len(pool))
                rows, rl = e.training_rows(0)
                order = np.argsort(rows, kind="stable")
                model = train_student(np.asarray(pool.images[rows[order]]), rl[order], n_cls, scfg, progress=False)
                acc = accuracy(predict(model, ft_test.images, progress=False), ft_test.labels)
                ft.append({"bytes_target": b, "kept": k, "mode": m, "trained_on": int(len(rows)),
                           "epochs": scfg.epochs, "accuracy": acc, "test_images": len(ft_test),
                           "seconds": round(time.time() - t1, 1)})
                log(f"[{target}] finetune {m} @ {b} B: {acc:.4f} ({ft[-1]['seconds']} s)")
    return {
        "target": target, "classes": n_cls, "far_ood": highest,
        "teacher": {"model": cfg.teacher, "res": cfg.teacher_res, "accuracy": tinfo["test_accuracy"]},
        "constants": constants(), "points": points, "validation": {"grid": grid, "val_images": len(val_y),
                                                                  "split": "train"},
        "paper_points": paper_pts, "moonshot_ratio": moon["ratio"], "moonshot": moon, "int8_head": head,
        "finetune": ft, "spread_points": spread_points, "seconds": round(time.time() - t0, 1),
    }


def constants() -> dict:
    names = ("PSEUDO_SHARE", "SELFTRAIN_ROUNDS", "ROUND_STEPS", "KNN_K", "KNN_MAX", "KNN_DIM", "SPREAD_ALPHA",
             "SPREAD_ITERS", "EDGE_POWER", "PROPAGATE_WEIGHTED", "FINETUNE_CAP", "FINETUNE_STEP_FACTOR")
    return {n: getattr(receiver, n) for n in names}


def validation_summary(res: dict) -> dict:
    """Mean validation accuracy of each grid cell over targets and sizes, and the best cell per mode."""
    table: dict[tuple, list[float]] = {}
    for r in res["targets"].values():
        for g in r["validation"]["grid"]:
            key = tuple((k, g[k]) for k in ("mode", "share", "rounds", "k", "weighted") if k in g)
            table.setdefault(key, []).append(g["val_accuracy"])
    rows = [{**dict(k), "mean_val_accuracy": float(np.mean(v)), "cells": len(v)} for k, v in table.items()]
    best = {}
    for r in rows:
        if r["mode"] not in best or r["mean_val_accuracy"] > best[r["mode"]]["mean_val_accuracy"]:
            best[r["mode"]] = r
    return {"rows": rows, "best": best}


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def write_markdown(res: dict, path: Path, plots: dict[str, str]) -> None:
    cfg = res["config"]
    seeds = len(cfg["seeds"])
    L = ["# Receiver modes: using the whole pool the receiver holds", "",
         f"Command: `{res['command']}` ({res['machine']}; {res['wall_seconds'] / 60:.1f} min; seeds "
         f"{cfg['seeds']}). Pool: {res['pool_size']:,} images. Payloads: lowest-energy selections of the full "
         "teacher (highest-energy for the far out-of-distribution target, as the paper), each the largest keep "
         "count whose real `.plada` file fits the byte target. Accuracy: linear "
         f"student (frozen {cfg['student']} @{cfg['student_res']} px + softmax head, {cfg['head_steps']} steps), "
         f"mean ± std of {seeds} seeds on the test split. Receiver constants: `{res['constants']}`.", "",
         "*forecast picks*: the mode the sender names (`--set receiver=auto`: the proxy student's accuracy on "
         "target train images the teacher never saw, under each mode's expansion, 3 seeds; plain on ties), and "
         "that mode's test accuracy minus plain's (– : the run predates the forecast).", "",
         "## Accuracy against payload bytes (linear student)", "",
         "| target | bytes | kept | " + " | ".join(MODES) + " | best pool mode − plain | forecast picks "
         "| picked − plain |", "|---|---|---|" + "---|" * len(MODES) + "---|---|---|"]
    for t, r in res["targets"].items():
        for p in r["points"]:
            a = {m: p["modes"][m]["accuracy"] for m in MODES}
            gain = max(a[m]["mean"] for m in POOL_MODES) - a["plain"]["mean"]
            fc = p.get("forecast")
            pick = (f"{fc['choice']} | {100 * (a[fc['choice']]['mean'] - a['plain']['mean']):+.1f}" if fc
                    else "– | –")
            L.append(f"| {t} | {p['bytes']:,} | {p['kept']:,} | " + " | ".join(
                f"{pct(a[m]['mean'])} ± {pct(a[m]['std'])}" for m in MODES)
                + f" | {100 * gain:+.1f} | {pick} |")
    sp = [(t, q, {p["bytes_target"]: p for p in r["points"]}.get(q["bytes_target"]))
          for t, r in res["targets"].items() for q in r.get("spread_points", [])]
    if sp:
        L += ["", "## A receiver-aware selection: seeds spread over the receiver's kNN graph", "",
              "`spread_order` (benchmarks/receiver.py): lowest-energy order, but an image whose same-label *cover* "
              "nearest neighbours already hold a kept image waits until every uncovered one is kept. Test accuracy "
              "(linear student, mean of the seeds) per mode; *forecast* is the sender's proxy on held-out target "
              "train images (validation data), its best mode, next to the lowest-energy selection's at the same "
              "byte target.", "",
              "| target | cover | bytes | kept | " + " | ".join(MODES) + " | best − lowest-energy's best "
              "| forecast: spread | forecast: lowest-energy |",
              "|---|---|---|---|" + "---|" * len(MODES) + "---|---|---|"]
        for t, q, le_p in sp:
            a = {m: q["modes"][m]["accuracy"]["mean"] for m in MODES}
            d = (max(a.values()) - max(le_p["modes"][m]["accuracy"]["mean"] for m in MODES)) if le_p else None
            f, g = q["forecast"], (le_p or {}).get("forecast")
            L.append(f"| {t} | {q['cover']} | {q['bytes']:,} | {q['kept']:,} | "
                     + " | ".join(pct(a[m]) for m in MODES)
                     + f" | {'–' if d is None else f'{100 * d:+.1f}'} | {f['choice']} {pct(f['modes'][f['choice']])} | "
                     + (f"{g['choice']} {pct(g['modes'][g['choice']])}" if g else "–") + " |")
    L += ["", "## Against the paper policy (plain receiver) and the int8 head", "",
          "moonshot ratio = bytes of the cheapest whole-pool point within "
          f"{100 * cfg['tolerance']:g} point of the paper policy's best plain accuracy / that best's bytes "
          "(lower is better; – : no point within our byte range reaches it).", "",
          "| target | paper best | its bytes | cheapest whole-pool point within 1 pt | ratio | best whole-pool point | "
          "int8 head | plada at ≤ its bytes |", "|---|---|---|---|---|---|---|---|"]
    for t, r in res["targets"].items():
        m = r["moonshot"]
        b, c, bw, h = m["paper_best"], m["cheapest"], m["best_whole_pool"], r["int8_head"]
        pl = h["plada_at_no_more_bytes"]
        L.append(f"| {t} | {pct(b['accuracy']['mean'])} (keep {b['keep']:g}) | {b['bytes']:,} | "
                 + (f"{c['mode']} {pct(c['accuracy'])} at {c['bytes']:,} B" if c else "none") + " | "
                 + (f"{m['ratio']:.3f}" if m["ratio"] is not None else "–") + " | "
                 + (f"{bw['mode']} {pct(bw['accuracy'])} at {bw['bytes']:,} B" if bw else "–") + " | "
                 f"{pct(h['accuracy'])} at {h['bytes']:,} B | "
                 + (f"{pl['mode']} {pct(pl['accuracy'])} at {pl['bytes']:,} B" if pl else "–") + " |")
    folded = [(t, r) for t, r in res["targets"].items() if r.get("head_mode")]
    if folded:
        L += ["", "## Receiver mode head (folded in from benchmarks.pool_head)", "",
              f"From `{folded[0][1]['head_mode']['command']}` ({folded[0][1]['head_mode']['from']}): the payload "
              "carries a linear head in the pool's PCA space, chosen on held-out train images under each budget; "
              "the linear student trains on the pool images the head labels. `moonshot_ratio` is the best of the "
              "label modes' ratio (table above) and this one.", "",
              "| target | cheapest head point within 1 pt | head ratio | label modes' ratio | moonshot_ratio | "
              "head mode at ≤ int8 head's bytes |", "|---|---|---|---|---|---|"]
        for t, r in folded:
            hm, lab = r["head_mode"]["moonshot"], r["moonshot"]["ratio"]
            c, hb = hm["cheapest"], r["int8_head"].get("head_mode_at_no_more_bytes")
            L.append(f"| {t} | " + (f"{pct(c['linear_student'])} at {c['bytes']:,} B" if c else "none") + " | "
                     + (f"{hm['ratio']:.3f}" if hm["ratio"] is not None else "–") + " | "
                     + (f"{lab:.3f}" if lab is not None else "–") + " | "
                     + (f"{r['moonshot_ratio']:.3f}" if r["moonshot_ratio"] is not None else "–") + " | "
                     + (f"{pct(hb['student'])} at {hb['bytes']:,} B (int8 head {pct(r['int8_head']['accuracy'])} at "
                        f"{r['int8_head']['bytes']:,} B)" if hb else "–") + " |")
    val = [(t, x) for t, r in res["targets"].items() for x in r.get("head_vs_labels_on_validation", [])]
    if val:
        d = res["default_on_validation"]
        L += ["", "## The budget's default payload, chosen on validation data", "",
              "Held-out target *train* images only (the head: `plada.head.choose`'s held-out rows; labels: the "
              "proxy's forecast for the best label mode, or the validation grid's best cell where a record has no "
              f"forecast). Head ahead in {d['head_wins']} of {d['cells']} cells, by {100 * d['min_gap']:.1f} to "
              f"{100 * d['max_gap']:.1f} points: `config.BUDGET_RECEIVER = \"head\"`.", "",
              "| target | budget | head (bytes) | best label mode (bytes) | gap | label side |",
              "|---|---|---|---|---|---|"]
        L += [f"| {t} | {x['budget']:,} | {pct(x['head'])} ({x['head_bytes']:,}) | {pct(x['label'])} "
              f"({x['label_bytes']:,}) | {100 * x['gap']:+.1f} | {x['label_source']} |" for t, x in val]
    ft = [(t, f) for t, r in res["targets"].items() for f in r["finetune"]]
    if ft:
        L += ["", "## Fine-tuned students (1 run each)", "",
              f"The paper's recipe ({cfg['finetune_epochs']:g} epochs on the payload; a pool mode's set capped at "
              f"{res['constants']['FINETUNE_CAP']:,} images and {res['constants']['FINETUNE_STEP_FACTOR']:g}× the "
              f"payload's steps), evaluated on {cfg['finetune_test_limit'] or 'all'} test images.", "",
              "| target | bytes target | kept | mode | trained on | epochs | accuracy | seconds |",
              "|---|---|---|---|---|---|---|---|"]
        L += [f"| {t} | {f['bytes_target']:,} | {f['kept']:,} | {f['mode']} | {f['trained_on']:,} | "
              f"{f['epochs']:.2f} | {pct(f['accuracy'])} | {f['seconds']} |" for t, f in ft]
    summ = res.get("validation_summary")
    if summ and summ["rows"]:
        L += ["", "## Validation (target train images, seed 0): the numbers behind the constants", "",
              f"Each cell: linear student's accuracy on {cfg['val_limit']:,} target *train* images (never the test "
              f"split), mean over targets and the sizes {cfg['val_bytes']} B.", "",
              "| mode | share | rounds | k | weighted | mean val accuracy | cells |", "|---|---|---|---|---|---|---|"]
        for row in sorted(summ["rows"], key=lambda r: (r["mode"], -r["mean_val_accuracy"])):
            L.append(f"| {row['mode']} | {row.get('share', '–')} | {row.get('rounds', '–')} | {row.get('k', '–')} | "
                     f"{row.get('weighted', '–')} | {pct(row['mean_val_accuracy'])} | {row['cells']} |")
        L += ["", "Best per mode: " + "; ".join(f"{m}: {b}" for m, b in summ["best"].items())]
    L += ["", "## Plots", ""] + [f"![{t}]({p})" for t, p in plots.items()]
    paper.write_keeping_discussion(path, L)


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for m, style in zip(MODES, ("o-", "s-", "^-"), strict=False):
        pts = r["points"]
        ax.errorbar([p["bytes"] for p in pts], [100 * p["modes"][m]["accuracy"]["mean"] for p in pts],
                    yerr=[100 * p["modes"][m]["accuracy"]["std"] for p in pts], fmt=style, capsize=2,
                    label=f"{m} receiver (linear)")
    pp = r["paper_points"]
    ax.plot([p["bytes"] for p in pp], [100 * p["accuracy"]["mean"] for p in pp], "k:x", label="paper policy, plain")
    for f in r["finetune"]:
        ax.scatter([f["bytes_target"]], [100 * f["accuracy"]], marker="D" if f["mode"] == "plain" else "P", s=40,
                   c="tab:grey" if f["mode"] == "plain" else "tab:red")
    if r["finetune"]:
        ax.scatter([], [], marker="D", c="tab:grey", label="fine-tuned, plain")
        ax.scatter([], [], marker="P", c="tab:red", label="fine-tuned, pool mode")
    h = r["int8_head"]
    ax.plot([h["bytes"]], [100 * h["accuracy"]], "*", ms=12, label="int8 linear head")
    ax.axhline(100 * r["moonshot"]["paper_best"]["accuracy"]["mean"] - 1, color="grey", lw=0.7, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes (.plada file, log scale)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{r['target']}: receiver modes (dotted: paper best − 1 pt)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.receiver", description=__doc__.split("\n\n")[0])
    paper.add_common_args(ap)
    ap.add_argument("--no-validate", action="store_true", help="skip the validation grid")
    ap.add_argument("--finetune-targets", nargs="*", default=None,
                    help="targets with fine-tuned students (default: all)")
    ap.add_argument("--finetune-bytes", nargs="+", type=int, default=None, metavar="B",
                    help="byte targets of the fine-tuned students (default: 1000 5000)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="combine per-target runs (their results JSON) into one report instead of running")
    ap.add_argument("--head-from", default=None, metavar="JSON",
                    help="with --merge: fold in receiver mode head's record (results/pool_head.json)")
    a = ap.parse_args(argv)
    if a.merge:
        return merge([Path(m) for m in a.merge], Path(a.out_dir), a.quick,
                     Path(a.head_from) if a.head_from else None)
    cfg = paper.apply_common_args(ReceiverConfig(), a, quick_config)
    cfg.validate = not a.no_validate
    if a.finetune_targets is not None:
        cfg.finetune_targets = tuple(a.finetune_targets)
    if a.finetune_bytes:
        cfg.finetune_bytes = tuple(a.finetune_bytes)
    out = Path(a.out_dir)
    extra = (("--no-validate", a.no_validate), ("--finetune-targets", a.finetune_targets),
             ("--finetune-bytes", a.finetune_bytes))
    res = paper.run_all("receiver", cfg, a, run_target, extra_flags=extra)
    if res is None:
        return 2
    res["constants"] = constants()
    return write_all(res, out, a.quick)


def fold_head(res: dict, path: Path) -> None:
    """Receiver mode head's record (benchmarks.pool_head's JSON) beside each target's label modes.

    `moonshot_ratio` becomes the better of the label modes' ratio (kept in `moonshot`) and the head mode's,
    both against the same paper-policy best; the int8 head gains the head mode's best point at no more bytes.
    Idempotent: folding twice gives the same record.
    """
    head = json.loads(path.read_text())
    for t, r in res["targets"].items():
        h = head.get("targets", {}).get(t)
        if not h:
            continue
        moon = head_moonshot(h["points"], r["moonshot"]["paper_best"], res["config"]["tolerance"])
        r["head_mode"] = {"from": str(path), "command": head["command"], "points": h["points"], "moonshot": moon}
        ratios = [(x, m) for x, m in ((r["moonshot"]["ratio"], "label modes"), (moon["ratio"], "head"))
                  if x is not None]
        best = min(ratios) if ratios else (None, None)
        r["moonshot_ratio"], r["moonshot_from"] = best
        r["int8_head"]["head_mode_at_no_more_bytes"] = (h.get("int8_head") or {}).get("head_mode_at_no_more_bytes")
        r["head_vs_labels_on_validation"] = head_vs_labels(r, h)
    res["head_from"] = str(path)
    rows = [x for r in res["targets"].values() for x in r.get("head_vs_labels_on_validation", [])]
    res["default_on_validation"] = {
        "rule": "under a byte budget the default payload is the one more accurate on held-out target train images",
        "cells": len(rows), "head_wins": sum(x["gap"] > 0 for x in rows),
        "min_gap": min((x["gap"] for x in rows), default=None), "max_gap": max((x["gap"] for x in rows), default=None)}


def head_moonshot(points: list[dict], best: dict | None, tolerance: float) -> dict:
    """The head's cheapest point within `tolerance` of *this* record's paper-policy best.

    Why here and not pool_head's own figure: that one was measured against the paper best of the day it ran;
    a re-run target (a new teacher) moves the paper best, and both ratios must share one denominator.
    """
    if best is None:
        return {"ratio": None, "paper_best": None, "cheapest": None}
    acc = best["accuracy"]["mean"] if isinstance(best["accuracy"], dict) else best["accuracy"]
    reach = [p for p in points if p["linear_student"]["mean"] >= acc - tolerance]
    cheap = min(reach, key=lambda p: p["bytes"]) if reach else None
    return {"ratio": cheap["bytes"] / best["bytes"] if cheap else None,
            "paper_best": {"accuracy": acc, "bytes": best["bytes"]},
            "cheapest": ({"bytes": cheap["bytes"], "linear_student": cheap["linear_student"]["mean"],
                          "head": cheap["head_accuracy"]} if cheap else None)}


def head_vs_labels(r: dict, h: dict) -> list[dict]:
    """Per budget, on held-out target *train* images only: the head's forecast against the best label mode's.

    Why: the budget's default payload (config.BUDGET_RECEIVER) is chosen on validation data, never on the test
    split. The label side is the linear proxy's forecast per mode at that budget (`forecast.modes`), or, for a
    record made before forecasts were kept, the best cell of the validation grid at that size.
    """
    grid: dict[int, float] = {}
    for g in (r.get("validation") or {}).get("grid", []):
        grid[g["bytes_target"]] = max(grid.get(g["bytes_target"], 0.0), g["val_accuracy"])
    out = []
    for hp in h["points"]:
        lp = next((p for p in r["points"] if p["bytes_target"] == hp["budget"]), None)
        if lp is None:
            continue
        modes = (lp.get("forecast") or {}).get("modes")
        label, source = ((max(modes.values()), "proxy forecast") if modes else
                         (grid.get(hp["budget"]), "validation grid"))
        if label is None:
            continue
        out.append({"budget": hp["budget"], "head_bytes": hp["bytes"], "head": hp["forecast"],
                    "label_bytes": lp["bytes"], "label": label, "label_source": source,
                    "gap": hp["forecast"] - label})
    return out


def merge(paths: list[Path], out: Path, quick: bool, head_from: Path | None = None) -> int:
    """One report from runs made one target at a time (a long grid split across sessions)."""
    res = paper.merge_runs(paths, lambda r: r["constants"], replace=True)
    if res is None:
        return 2
    if head_from is not None:
        fold_head(res, head_from)
    return write_all(res, out, quick)


def write_all(res: dict, out: Path, quick: bool) -> int:
    stem = "receiver_quick" if quick else "receiver"
    res["validation_summary"] = validation_summary(res)
    path = paper.save_results(res, out, stem)
    plots = {}
    for t, r in res["targets"].items():
        rel = f"plots/{stem}_{t}.png"
        plot(r, out / paper.REPORTS / rel)
        plots[t] = rel
    write_markdown(res, out / paper.REPORTS / ("RECEIVER.md" if not quick else "RECEIVER_quick.md"), plots)
    print(f"wrote {path} and docs in {math.ceil(res['wall_seconds'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
