"""Which teacher should `plada send` train on a target it has never seen? Chosen on held-out *train* images.

    python -m benchmarks.teacher_recipe          # benchmarks/reports/teacher_recipe.{json,md}
    python -m benchmarks.teacher_recipe --quick  # tiny data, a minute

A teacher's labels and energies are everything a label payload carries, and its recipe was fitted to CIFAR-10's
50,000 images: 2 epochs are 780 steps there but 54 on Flowers-5's 3,430 images (and about 90 on a 5,784-image
Caltech-101, where a linear probe beat that fine-tune by 12 points on the test split, issue 17). Per target, the
train rows `head.holdout_mask` holds out (20%, seeded; whole tracks for GTSRB, whose images come 30 to a track)
score three recipes, each trained on the other 80% (the test split is not opened):

- ``epochs``: `TeacherConfig` as it was, 2 epochs of the target's train;
- ``samples``: fine-tuned until it has seen ``teacher_samples`` images (at least 2 epochs, at most 30): the
  length `benchmarks.paper` always gave its teachers, so steps, not epochs, are fixed;
- ``linear``: a linear probe of the frozen backbone (`train.fit_linear`, 1,000 steps).

``samples`` is not trained where it is within 10% of ``epochs``' length (the same recipe, near enough).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace

import numpy as np

from benchmarks import head_share, paper
from plada import head as headmod
from plada.auto import name_groups
from plada.config import TeacherConfig, epochs_for
from plada.data import cache_root, load_source
from plada.pool import Pool
from plada.teacher import train_teacher
from plada.train import accuracy, predict

RECIPES = ("epochs", "samples", "linear")


@dataclass
class RecipeConfig(head_share.ShareConfig):
    epochs: float = 2.0  # the ``epochs`` recipe
    max_epochs: float = 30.0  # the ``samples`` recipe's bound on small targets
    train_limit: int | None = None  # all of train, as `plada send` trains on (--quick: a subset)


def quick_config(cfg: RecipeConfig) -> RecipeConfig:
    cfg = head_share.quick_config(cfg)
    cfg.epochs, cfg.train_limit = 1.0, 600
    return cfg


def recipes(cfg: RecipeConfig, n: int, flip: bool) -> dict[str, TeacherConfig]:
    base = TeacherConfig(model=cfg.teacher, res=cfg.teacher_res, epochs=cfg.epochs, flip=flip)
    out = {"epochs": base}
    epochs = epochs_for(n, cfg.teacher_samples, cfg.epochs, cfg.max_epochs)
    if epochs > 1.1 * cfg.epochs:
        out["samples"] = replace(base, epochs=epochs)
    out["linear"] = replace(base, mode="linear")
    return out


def run_target(target: str, pool: Pool, cfg: RecipeConfig, data: str | None, log) -> dict:
    t0 = time.time()
    train = load_source(target, data).split("train")
    train = train.subset(cfg.train_limit, seed=0)
    pattern = cfg.holdout_groups.get(target)
    groups = name_groups(train.files, pattern) if pattern and train.files is not None else None
    held = headmod.holdout_mask(len(train), 0, groups)
    fit_split = train.take(np.flatnonzero(~held))
    val_x, val_y = np.asarray(train.images[np.flatnonzero(held)]), train.labels[held]
    rows = {}
    for name, tcfg in recipes(cfg, len(fit_split), target not in paper.NO_FLIP).items():
        model, info = train_teacher(fit_split, None, tcfg, cache_root() / "teachers", progress=False)
        acc = accuracy(predict(model, val_x, progress=False), val_y)
        steps = int(round(tcfg.epochs * np.ceil(len(fit_split) / tcfg.batch_size))) if tcfg.mode == "finetune" else None
        rows[name] = {"val_accuracy": acc, "mode": tcfg.mode, "epochs": tcfg.epochs if steps else None, "steps": steps,
                      "train_seconds": info["train_seconds"]}
        log(f"[{target}] {name}: val {acc:.4f} ({tcfg.mode}, {steps or '-'} steps, {info['train_seconds']} s)")
    return {"target": target, "train_images": len(fit_split), "val_images": int(held.sum()),
            "classes": len(train.class_names), "grouped": groups is not None, "recipes": rows,
            "seconds": round(time.time() - t0, 1)}


def summary(res: dict) -> dict:
    """Mean held-out accuracy per recipe over targets (``samples`` counts as ``epochs`` where not trained)."""
    acc = {t: {r: v["recipes"].get(r, v["recipes"]["epochs"])["val_accuracy"] for r in RECIPES}
           for t, v in res["targets"].items()}
    mean = {r: float(np.mean([a[r] for a in acc.values()])) for r in RECIPES}
    best = max(mean, key=mean.get)
    worst = {r: float(min(a[r] - max(a.values()) for a in acc.values())) for r in RECIPES}
    per_target_best = {t: max(a, key=a.get) for t, a in acc.items()}
    return {"mean_val_accuracy": mean, "best": best, "worst_loss_vs_target_best": worst,
            "per_target_best": per_target_best}


def write_markdown(res: dict, path) -> None:
    c = res["config"]
    L = ["# Teacher recipe: fine-tune for epochs, for a fixed number of images seen, or a linear probe (validation)",
         "", f"Command: `{res['command']}` — {res['wall_seconds'] / 60:.1f} min on {res['machine']}. Teacher "
         f"{c['teacher']} @ {c['teacher_res']} px; each recipe trained on 80% of the target's train rows and scored on "
         f"the other 20% (`head.holdout_mask`, seed 0; whole groups where marked). `samples`: fine-tuned until "
         f"{c['teacher_samples']:,} images seen (between {c['epochs']:g} and {c['max_epochs']:g} epochs). One run "
         "each. Accuracies in %.", "",
         "| target | classes | train / held out | epochs (steps) | samples (steps) | linear probe | best |",
         "|---|---|---|---|---|---|---|"]
    def cell(r: dict, name: str) -> str:
        if name not in r:
            return "= epochs"
        x = r[name]
        return f"{100 * x['val_accuracy']:.1f}" + (f" ({x['steps']})" if x["steps"] else "")

    def best(r: dict, name: str) -> str:
        return "epochs = samples" if name == "epochs" and "samples" not in r else name

    for t, v in res["targets"].items():
        r = v["recipes"]
        L.append(f"| {t} | {v['classes']} | {v['train_images']:,} / {v['val_images']:,}"
                 f"{' (grouped)' if v['grouped'] else ''} | "
                 + " | ".join(cell(r, k) for k in RECIPES) + f" | {best(r, res['summary']['per_target_best'][t])} |")
    s = res["summary"]
    L += ["", "Mean over targets: " + ", ".join(f"{k} {100 * m:.1f}" for k, m in s["mean_val_accuracy"].items())
          + f"; best on average: **{s['best']}**. Worst loss against each target's best recipe: "
          + ", ".join(f"{k} {100 * w:+.1f}" for k, w in s["worst_loss_vs_target_best"].items()) + "."]
    paper.write_keeping_discussion(path, L)


def main(argv: list[str] | None = None) -> int:
    return head_share.validation_main("teacher_recipe", __doc__, RecipeConfig(), quick_config, run_target, summary,
                                      write_markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
