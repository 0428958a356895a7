"""How long should the receiver fine-tune its student on a small label payload? Chosen on held-out *train* images.

    python -m benchmarks.student_recipe          # benchmarks/reports/student_recipe.{json,md}
    python -m benchmarks.student_recipe --quick  # tiny data, a minute

The paper's student trains 15 epochs of the payload (`plada receive`'s recipe until this benchmark): 75 steps
for the 532 images CIFAR-10's 1 KB payload keeps. Per target, the teacher of `benchmarks.teacher_recipe`
(trained on 80% of train with `plada send`'s default recipe, `TeacherConfig.for_train`) scores the pool, the
lowest-energy payload that fits each byte budget is cut (the real `.plada` file), and the student is scored on
the 20% of train rows the teacher never saw (the test split is not opened):

- ``epochs``: the paper's 15 epochs of the payload;
- ``samples``: fine-tuned until it has seen ``student_samples`` images (at least 15 epochs, at most 100);
- ``linear``: the linear student (frozen features + softmax head, 1,000 steps), for reference.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from benchmarks import head_share, paper, teacher_recipe
from benchmarks.receiver import largest_fitting
from plada import auto, receiver, select
from plada import head as headmod
from plada.auto import name_groups
from plada.config import STUDENT_EPOCHS, StudentConfig, TeacherConfig, epochs_for
from plada.data import cache_root, load_source
from plada.features import cached_features, feature_model
from plada.pool import Pool
from plada.score import score_pool
from plada.student import train_student
from plada.teacher import train_teacher
from plada.train import accuracy, predict

RECIPES = ("epochs", "samples", "linear")


@dataclass
class StudentRecipeConfig(teacher_recipe.RecipeConfig):
    budgets: tuple[int, ...] = (1000,)
    student_samples: int = 50_000
    student_max_epochs: float = 100.0


def quick_config(cfg: StudentRecipeConfig) -> StudentRecipeConfig:
    cfg = teacher_recipe.quick_config(cfg)
    cfg.budgets, cfg.student_samples = (600,), 2000
    return cfg


def run_target(target: str, pool: Pool, cfg: StudentRecipeConfig, data: str | None, log) -> dict:
    t0 = time.time()
    train = load_source(target, data).split("train").subset(cfg.train_limit, seed=0)
    n_cls, names = len(train.class_names), tuple(train.class_names)
    pattern = cfg.holdout_groups.get(target)
    groups = name_groups(train.files, pattern) if pattern and train.files is not None else None
    held = headmod.holdout_mask(len(train), 0, groups)
    fit_split = train.take(np.flatnonzero(~held))
    val_x, val_y = np.asarray(train.images[np.flatnonzero(held)]), train.labels[held]
    flip = target not in paper.NO_FLIP
    tcfg = TeacherConfig(model=cfg.teacher, res=cfg.teacher_res, flip=flip).for_train(len(fit_split))
    teacher, _ = train_teacher(fit_split, None, tcfg, cache_root() / "teachers", progress=False)
    scores = score_pool(teacher, pool, cache_root() / "scores", progress=False)
    plabels, energy = scores.labels, scores.energy()
    sizer = auto.payload_sizer(pool.fingerprint, len(pool), names, "plain", groups=pool.groups()[0])
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    val_f = np.asarray(predict(fm, val_x, progress=False, features=True))
    sel: dict[int, np.ndarray] = {}

    def top(k: int) -> np.ndarray:
        if k not in sel:
            sel[k] = select.select(plabels, energy, k, n_cls)
        return sel[k]

    points = []
    for budget in cfg.budgets:
        fit = largest_fitting(lambda k: sizer(top(k), plabels[top(k)], None), len(pool), budget)
        if fit is None:
            log(f"[{target}] {budget} B: not even one kept image fits")
            continue
        k, nbytes = fit
        idx = top(k)
        base = StudentConfig(model=cfg.student, res=cfg.student_res, mode="finetune", flip=flip, seed=0,
                             epochs=STUDENT_EPOCHS[0])
        epochs = epochs_for(k, cfg.student_samples, base.epochs, cfg.student_max_epochs)
        rows = {}
        for name, scfg in (("epochs", base), ("samples", replace(base, epochs=epochs))):
            t1 = time.time()
            model = train_student(np.asarray(pool.images_at(scfg.res)[idx]), plabels[idx], n_cls, scfg, progress=False)
            acc = accuracy(predict(model, val_x, progress=False), val_y)
            steps = int(round(scfg.epochs * np.ceil(k / scfg.batch_size)))
            rows[name] = {"val_accuracy": acc, "epochs": scfg.epochs, "steps": steps,
                          "seconds": round(time.time() - t1, 1)}
            log(f"[{target}] {budget} B k={k}: {name} {acc:.4f} ({steps} steps, {rows[name]['seconds']} s)")
        exp = receiver.expand("plain", pool_f, idx, plabels[idx], n_cls)
        w, b = receiver.fit_head(pool_f, exp, n_cls, steps=cfg.head_steps, seed=0)
        rows["linear"] = {"val_accuracy": accuracy(val_f @ w.T + b, val_y), "epochs": None, "steps": cfg.head_steps,
                          "seconds": None}
        log(f"[{target}] {budget} B k={k}: linear {rows['linear']['val_accuracy']:.4f}")
        points.append({"budget": budget, "bytes": nbytes, "kept": k, "recipes": rows})
    return {"target": target, "val_images": int(held.sum()), "grouped": groups is not None,
            "teacher_epochs": tcfg.epochs, "points": points, "seconds": round(time.time() - t0, 1)}


def summary(res: dict) -> dict:
    cells = [p for t in res["targets"].values() for p in t["points"]]
    mean = {r: float(np.mean([c["recipes"][r]["val_accuracy"] for c in cells])) for r in RECIPES} if cells else {}
    gain = [c["recipes"]["samples"]["val_accuracy"] - c["recipes"]["epochs"]["val_accuracy"] for c in cells]
    return {"mean_val_accuracy": mean, "samples_minus_epochs": {"mean": float(np.mean(gain)) if gain else None,
                                                                "worst": float(min(gain)) if gain else None},
            "cells": len(cells)}


def write_markdown(res: dict, path) -> None:
    c = res["config"]
    L = ["# Student recipe on a label payload: 15 epochs, or a fixed number of images seen (validation)", "",
         f"Command: `{res['command']}` — {res['wall_seconds'] / 60:.1f} min on {res['machine']}. Teacher and held-out "
         "rows as in `benchmarks.teacher_recipe` (80% / 20% of train; whole groups where marked); lowest-energy "
         f"payload at each budget; student {c['student']} @ {c['student_res']} px fine-tuned (one run, seed 0) for 15 "
         f"epochs or until {c['student_samples']:,} images seen (at most {c['student_max_epochs']:g} epochs); linear "
         "student for reference. Accuracy on the held-out train rows, %.", "",
         "| target | budget | kept | 15 epochs (steps) | images seen (steps) | linear |", "|---|---|---|---|---|---|"]
    for t, v in res["targets"].items():
        for p in v["points"]:
            r = p["recipes"]
            L.append(f"| {t}{' (grouped)' if v['grouped'] else ''} | {p['bytes']:,} B | {p['kept']:,} | "
                     f"{100 * r['epochs']['val_accuracy']:.1f} ({r['epochs']['steps']}) | "
                     f"{100 * r['samples']['val_accuracy']:.1f} ({r['samples']['steps']}) | "
                     f"{100 * r['linear']['val_accuracy']:.1f} |")
    s = res["summary"]
    if s["cells"]:
        L += ["", "Mean: " + ", ".join(f"{k} {100 * m:.1f}" for k, m in s["mean_val_accuracy"].items())
              + f"; images seen minus 15 epochs: mean {100 * s['samples_minus_epochs']['mean']:+.1f}, worst "
              f"{100 * s['samples_minus_epochs']['worst']:+.1f} points over {s['cells']} cells."]
    paper.write_keeping_discussion(path, L)


def main(argv: list[str] | None = None) -> int:
    return head_share.validation_main("student_recipe", __doc__, StudentRecipeConfig(), quick_config, run_target,
                                      summary, write_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
