"""Which student should a head payload's receiver train: linear or fine-tuned? Chosen on held-out *train* images.

    python -m benchmarks.head_student            # benchmarks/reports/head_student.{json,md}
    python -m benchmarks.head_student --quick    # tiny data, a minute

`config.HEAD_STUDENT` is the student a head payload gets when none is asked for. Here, per target and budget,
the sender's side of `plada.head.choose` is replayed (`benchmarks.head_share.replay`: the head fitted on 80% of
the train rows, whole groups for GTSRB), the receiver labels its pool with that head and keeps its surest
`receiver.HEAD_SHARE`, class-balanced, exactly as `plada receive` does (`receiver.expand`,
`receiver.student_recipe`), and each student is scored on the 20% of train rows the head never saw:

- ``head``: the head itself on frozen features (what the sender's forecast measures);
- ``linear``: a linear student on the pool's frozen features (3 seeds);
- ``finetune``: the paper's fine-tuned student on the pool images (one seed: minutes each on 2 cores).

The test split is not opened.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import head_share, paper
from plada import head as headmod
from plada import receiver
from plada.config import HEAD_STUDENT, STUDENT_EPOCHS, StudentConfig
from plada.pool import Pool
from plada.student import train_student
from plada.train import accuracy, predict


@dataclass
class StudentChoiceConfig(head_share.ShareConfig):
    budgets: tuple[int, ...] = (1000,)
    student_epochs: float = STUDENT_EPOCHS[0]  # the pool modes' reference fine-tune, before its step bound


def quick_config(cfg: StudentChoiceConfig) -> StudentChoiceConfig:
    cfg = head_share.quick_config(cfg)
    cfg.budgets, cfg.student_epochs = (600,), 1.0
    return cfg


def run_target(target: str, pool: Pool, cfg: StudentChoiceConfig, data: str | None, log) -> dict:
    t0 = time.time()
    r = head_share.replay(target, pool, cfg, data, log)
    val_f, val_y = r.train_f[r.held], r.train.labels[r.held]
    pca = headmod.basis(r.pool_f, receiver.basis_key(r.pool_f))
    rows = []
    for budget, h in r.heads:
        wq, bq = h.dequantised()
        exp = receiver.expand("head", r.pool_f, np.zeros(0, np.int64), np.zeros(0, np.int64), r.n_classes,
                              allowed=~pool.missing, head=h, progress=False)
        lin = []
        for s in cfg.seeds:
            w2, b2 = receiver.fit_head(r.pool_f, exp, r.n_classes, steps=cfg.head_steps, seed=s)
            lin.append(accuracy(val_f @ w2.T + b2, val_y))
        t1 = time.time()
        scfg = StudentConfig(model=cfg.student, res=cfg.student_res, mode="finetune", epochs=cfg.student_epochs,
                             flip=target not in paper.NO_FLIP, seed=0)
        e, scfg = receiver.student_recipe(exp, scfg, "head", 0, len(pool))
        trows, tl = e.training_rows(0)
        order = np.argsort(trows, kind="stable")
        model = train_student(np.asarray(pool.images_at(scfg.res)[trows[order]]), tl[order], r.n_classes, scfg,
                              progress=False)
        ft = accuracy(predict(model, r.train.images[r.held], progress=False), val_y)
        row = {"budget": budget, "dim": h.dim, "bits": h.bits, "pool_rows": int(len(exp.indices)),
               "head": accuracy(pca.project(val_f, h.dim) @ wq.T + bq, val_y),
               "linear": paper.mean_std(lin),
               "finetune": {"accuracy": ft, "trained_on": int(len(trows)), "epochs": round(scfg.epochs, 3),
                            "seconds": round(time.time() - t1, 1)}}
        rows.append(row)
        log(f"[{target}] {budget} B d={h.dim} {h.bits}-bit: head {row['head']:.4f}, linear {np.mean(lin):.4f}, "
            f"fine-tuned {ft:.4f} ({row['finetune']['seconds']} s)")
    return {"target": target, "val_images": int(r.held.sum()), "rows": rows, "seconds": round(time.time() - t0, 1)}


def summary(res: dict) -> dict:
    """Per cell, linear minus fine-tuned (points). The choice is the student with the higher mean over the cells,
    and each student's worst loss to the other is reported beside it: a default must not lose a far target."""
    gaps = [r["linear"]["mean"] - r["finetune"]["accuracy"] for t in res["targets"].values() for r in t["rows"]]
    if not gaps:
        return {"cells": 0, "choice": None}
    return {"cells": len(gaps), "linear_wins": int(sum(g > 0 for g in gaps)),
            "mean_gap_points": round(100 * float(np.mean(gaps)), 2),
            "linear_worst_loss_points": round(100 * float(max(0.0, -min(gaps))), 2),
            "finetune_worst_loss_points": round(100 * float(max(0.0, max(gaps))), 2),
            "choice": "linear" if np.mean(gaps) > 0 else "finetune"}


def write_markdown(res: dict, path: Path) -> None:
    L = ["# Head student: linear or fine-tuned student for a head payload (validation only)", "",
         f"Command: `{res['command']}` — {res['wall_seconds'] / 60:.1f} min on {res['machine']}. Each head is the one "
         "`plada.head.choose` picks at the budget, fitted on the rows it does not hold out; the receiver keeps its "
         f"surest {receiver.HEAD_SHARE:.0%} of the pool (at most {receiver.PSEUDO_MAX:,} images), class-balanced. "
         "Scored on the held-out train rows (the test "
         f"split is not opened). Linear: {res['config']['head_steps']} steps, mean ± std of seeds "
         f"{res['config']['seeds']}; fine-tuned: one run (seed 0), the receiver's own recipe "
         "(`receiver.student_recipe`). Accuracies in %.", "",
         "| target | budget | head | val images | head itself | linear student | fine-tuned student "
         "| linear − fine-tuned |",
         "|---|---|---|---|---|---|---|---|"]
    for t, v in res["targets"].items():
        for r in v["rows"]:
            lin, ft = r["linear"], r["finetune"]["accuracy"]
            L.append(f"| {t} | {r['budget']:,} B | d={r['dim']} {r['bits']}-bit | {v['val_images']:,} | "
                     f"{100 * r['head']:.1f} | {100 * lin['mean']:.1f} ± {100 * lin['std']:.1f} | {100 * ft:.1f} | "
                     f"{100 * (lin['mean'] - ft):+.1f} |")
    s = res["summary"]
    L += ["", f"Linear ahead in {s['linear_wins']} of {s['cells']} cells, by {s['mean_gap_points']:+} points on "
          f"average; the linear student's worst loss to the fine-tuned one {s['linear_worst_loss_points']} points, the "
          f"fine-tuned one's worst loss {s['finetune_worst_loss_points']} points. Choice (higher mean): "
          f"`{s['choice']}` (`config.HEAD_STUDENT` = `{HEAD_STUDENT}`)."]
    paper.write_keeping_discussion(path, L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.head_student", description=__doc__.split("\n\n")[0])
    paper.add_common_args(ap)
    ap.add_argument("--budgets", type=int, nargs="+", default=None, help="payload budgets in bytes (default 1000)")
    a = ap.parse_args(argv)
    cfg = paper.apply_common_args(StudentChoiceConfig(), a, quick_config)
    if a.budgets:
        cfg.budgets = tuple(a.budgets)
    res = paper.run_all("head_student", cfg, a, run_target, extra_flags=(("--budgets", a.budgets),))
    if res is None:
        return 2
    head_share.save_report(res, a, "head_student", summary, write_markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
