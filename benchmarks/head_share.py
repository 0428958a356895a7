"""Which share of the pool should a head-mode receiver train on? Chosen on held-out *train* images, never test.

    python -m benchmarks.head_share            # benchmarks/reports/head_share.{json,md}
    python -m benchmarks.head_share --quick    # tiny data, seconds

`receiver.HEAD_SHARE` (0.25) was hand-set. Here, per target, the sender's side of `plada.head.choose` is
replayed at the 1 KB and 5 KB budgets: the head is fitted on 80% of the train rows (the same seeded split
as `choose`, whole groups for GTSRB), the receiver labels its pool with that head, and a linear student
(`receiver.fit_head`, 3 seeds) trains on the surest share of the pool, class-balanced, for each share; it is
scored on the 20% of train rows the head never saw. The test split is not opened.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks import paper
from plada import head as headmod
from plada import payload, receiver
from plada.auto import name_groups
from plada.data import load_source
from plada.features import cached_features, feature_model, split_key
from plada.pool import Pool
from plada.train import accuracy

SHARES = (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


@dataclass
class ShareConfig(paper.Config):
    shares: tuple[float, ...] = SHARES
    budgets: tuple[int, ...] = (1000, 5000)
    holdout_groups: dict[str, str] = field(default_factory=lambda: {"gtsrb32": r"^(\d+)_"})


def quick_config(cfg: ShareConfig) -> ShareConfig:
    cfg = paper.quick_config(cfg)
    cfg.shares, cfg.budgets = (0.1, 0.5), (600,)
    return cfg


@dataclass
class Replay:
    """The sender's side of `plada.head.choose`, replayed without the test split: what each benchmark of the
    head-mode receiver starts from."""

    train: object  # the target train subset the sender fits on (its images, labels, files)
    train_f: np.ndarray  # its frozen features
    pool_f: np.ndarray  # the pool's frozen features (a memory map)
    held: np.ndarray  # the train rows `choose` holds out: the validation rows
    heads: list  # (budget, head fitted on the other rows, with the width and bits `choose` picked)
    n_classes: int


def replay(target: str, pool: Pool, cfg: ShareConfig, data: str | None, log) -> Replay:
    """Per budget, the head `choose` picks, refitted on the non-held-out rows only (as `choose` scores it)."""
    src = load_source(target, data)
    train = src.split("train")
    n_cls, names = len(train.class_names), tuple(train.class_names)
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    trn = train.subset(cfg.train_feature_limit, seed=0)
    train_f = np.asarray(cached_features(fm, trn.images, split_key(src.root, "train", len(trn))))
    pca = headmod.basis(pool_f, receiver.basis_key(pool_f))
    pattern = cfg.holdout_groups.get(target)
    groups = name_groups(trn.files, pattern) if pattern and trn.files is not None else None
    held = headmod.holdout_mask(len(trn), 0, groups)  # choose's own split: the rows the head never saw

    def size_of(h: payload.Head) -> int:
        return len(payload.encode(payload.Payload(pool.fingerprint, len(pool), names, np.zeros(0, np.int64),
                                                  np.zeros(0, np.int64), forecast=0.1234, receiver="head", head=h)))

    heads = []
    for budget in cfg.budgets:
        try:
            ch = headmod.choose(train_f, trn.labels, n_cls, pca, cfg.student, cfg.student_res, size_of, budget,
                                seed=0, groups=groups)
        except Exception as e:  # a budget below the smallest head: recorded, not fatal
            log(f"[{target}] {budget} B: {e}")
            continue
        w, b = headmod.fit(pca.project(train_f[~held], ch.head.dim), trn.labels[~held], n_cls, 0)
        heads.append((budget, headmod.quantise(w, b, ch.head.bits, cfg.student, cfg.student_res)))
    return Replay(trn, train_f, pool_f, held, heads, n_cls)


def run_target(target: str, pool: Pool, cfg: ShareConfig, data: str | None, log) -> dict:
    t0 = time.time()
    r = replay(target, pool, cfg, data, log)
    rows = []
    for budget, h in r.heads:
        for share in cfg.shares:
            exp = receiver.expand("head", r.pool_f, np.zeros(0, np.int64), np.zeros(0, np.int64), r.n_classes,
                                  pseudo=int(round(share * len(r.pool_f))), allowed=~pool.missing, head=h,
                                  progress=False)
            accs = []
            for s in cfg.seeds:
                w2, b2 = receiver.fit_head(r.pool_f, exp, r.n_classes, steps=cfg.head_steps, seed=s)
                accs.append(accuracy(r.train_f[r.held] @ w2.T + b2, r.train.labels[r.held]))
            rows.append({"budget": budget, "dim": h.dim, "bits": h.bits, "share": share,
                         "pool_rows": int(len(exp.indices)), "val_accuracy": paper.mean_std(accs)})
            log(f"[{target}] {budget} B d={h.dim} {h.bits}-bit share {share:g}: {len(exp.indices)} pool rows, "
                f"val {np.mean(accs):.4f}")
    return {"target": target, "val_images": int(r.held.sum()), "grouped": cfg.holdout_groups.get(target) is not None,
            "rows": rows, "seconds": round(time.time() - t0, 1)}


def summary(res: dict) -> dict:
    """Mean held-out accuracy per share over every (target, budget) cell, and the best share."""
    cells = [r for t in res["targets"].values() for r in t["rows"]]
    mean = {str(s): float(np.mean([c["val_accuracy"]["mean"] for c in cells if c["share"] == s]))
            for s in res["config"]["shares"] if any(c["share"] == s for c in cells)}
    return {"mean_val_accuracy": mean, "best_share": max(mean, key=mean.get) if mean else None,
            "cells": len({(t, r["budget"]) for t, v in res["targets"].items() for r in v["rows"]})}


def write_markdown(res: dict, path: Path) -> None:
    shares = res["config"]["shares"]
    L = ["# Head share: which share of the pool the head-mode receiver trains on (validation only)", "",
         f"Command: `{res['command']}` — {res['wall_seconds'] / 60:.1f} min on {res['machine']}. Linear student "
         f"({res['config']['head_steps']} steps, seeds {res['config']['seeds']}) on the surest share of the pool the "
         "head labels, scored on the train rows the head never saw (the test split is not opened). Accuracies in %.",
         "", "| target | budget | head | " + " | ".join(f"share {s:g}" for s in shares) + " |",
         "|---|---|---|" + "---|" * len(shares)]
    for t, v in res["targets"].items():
        for budget in sorted({r["budget"] for r in v["rows"]}):
            rs = {r["share"]: r for r in v["rows"] if r["budget"] == budget}
            head = next(iter(rs.values()))
            L.append(f"| {t} | {budget:,} B | d={head['dim']} {head['bits']}-bit | " + " | ".join(
                f"{100 * rs[s]['val_accuracy']['mean']:.1f}" if s in rs else "–" for s in shares) + " |")
    s = res["summary"]
    L += ["", "Mean over the cells: " + ", ".join(f"share {k}: {100 * m:.1f}" for k, m in
                                                  s["mean_val_accuracy"].items())
          + f". Best: {s['best_share']} (today's `receiver.HEAD_SHARE` = {receiver.HEAD_SHARE:g})."]
    paper.write_keeping_discussion(path, L)


def main(argv: list[str] | None = None) -> int:
    return validation_main("head_share", __doc__, ShareConfig(), quick_config, run_target, summary, write_markdown,
                           argv)


def validation_main(stem: str, doc: str, cfg, quick, run_target, summarise, write_md,
                    argv: list[str] | None = None) -> int:
    """The whole command line of a validation-only benchmark: common options, every target, its report."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{stem}", description=doc.split("\n\n")[0])
    paper.add_common_args(ap)
    a = ap.parse_args(argv)
    cfg = paper.apply_common_args(cfg, a, quick)
    res = paper.run_all(stem, cfg, a, run_target)
    if res is None:
        return 2
    save_report(res, a, stem, summarise, write_md)
    return 0


def save_report(res: dict, a: argparse.Namespace, stem: str, summarise, write_md) -> None:
    """Summary, then benchmarks/reports/<stem>[_quick].{json,md} under --out-dir: the head benchmarks' one tail."""
    res["summary"] = summarise(res)
    out = Path(a.out_dir) / paper.REPORTS
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{stem}_quick" if a.quick else stem
    (out / f"{stem}.json").write_text(json.dumps(res, indent=1, sort_keys=True) + "\n")
    write_md(res, out / f"{stem}.md")
    print(f"wrote {out / stem}.json and .md: {res['summary']}")


if __name__ == "__main__":
    sys.exit(main())
