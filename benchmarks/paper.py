"""The paper's experiments at our scale: keep ratio, selection policy, payload bytes, baselines.

    python -m benchmarks.paper            # full grid: results/paper.json, benchmarks/reports/PAPER.md and plots/
    python -m benchmarks.paper --quick    # small subset, minutes (also run by the test suite)

Pool: every Tiny-ImageNet-32 image (120,000). Per target: a teacher is fine-tuned once (seed 0) and
scores the pool once (both cached); every selection is then evaluated with a student. Student
mode `linear` (frozen pretrained EfficientNet-Lite0 features, trained softmax head) runs the whole
grid with 3 seeds; mode `finetune` (the paper's recipe: full fine-tune, AdamW 1e-3, cosine) runs
the headline cells. Every number in the outputs says which mode made it and over how many seeds.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import zstandard
from PIL import Image

from benchmarks.bits import index_costs
from plada import payload, select
from plada.data import Split, cache_root, load_source
from plada.errors import PladaError
from plada.features import cached_features, feature_model, split_key
from plada.pool import Pool, build_pool, open_pool, pools_dir
from plada.score import score_pool
from plada.student import StudentConfig, train_student
from plada.teacher import TeacherConfig, train_teacher
from plada.train import accuracy, predict, train_head

TARGETS = ("cifar10", "flowers5", "gtsrb32", "fashion_mnist")
NO_FLIP = {"gtsrb32"}  # mirrored traffic signs change meaning
KEEPS = (0.01, 0.05, 0.10, 0.25, 0.50, 1.00)
POLICY_KEEPS = (0.01, 0.05)
SAFETY_SHARE = 0.2
POLICIES = {  # name -> (policy, safety share, alpha)
    "lowest-energy": ("lowest-energy", 0.0, 0.5),
    "highest-energy": ("highest-energy", 0.0, 0.5),
    "lowest-entropy": ("lowest-entropy", 0.0, 0.5),
    "random": ("random", 0.0, 0.5),
    "safety-net a=0.5": ("lowest-energy", SAFETY_SHARE, 0.5),
    "safety-net a=-0.2": ("lowest-energy", SAFETY_SHARE, -0.2),
}
PER_CLASS = (1, 2, 4, 8, 16)  # real-image baselines: images per class
DISCUSSION = "## Discussion (hand-written)"
REPORTS = Path("benchmarks") / "reports"  # generated tables; docs/RESULTS.md summarises them


@dataclass
class Config:
    pool: str = "tinyimagenet32"
    targets: tuple[str, ...] = TARGETS
    teacher: str = "efficientnet-lite0"
    teacher_res: int = 64
    teacher_samples: int = 50_000  # images seen while fine-tuning (epochs = samples / train size, max 30)
    teacher_limit: int | None = 25_000
    student: str = "efficientnet-lite0"
    student_res: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    head_steps: int = 1000
    test_limit: int | None = None
    train_feature_limit: int | None = 20_000
    finetune_keeps: tuple[float, ...] = (0.01,)
    finetune_policies: tuple[str, ...] = ("lowest-energy", "random")
    finetune_epochs: float = 10.0
    keeps: tuple[float, ...] = KEEPS
    policy_keeps: tuple[float, ...] = POLICY_KEEPS
    per_class: tuple[int, ...] = PER_CLASS
    notes: list[str] = field(default_factory=list)


def quick_config(cfg: Config) -> Config:
    """Small enough for the test suite: 10k-image pool, tiny teacher budget, 32 px, two seeds."""
    cfg.pool = "tinyimagenet32:val" if cfg.pool == "tinyimagenet32" else cfg.pool
    cfg.targets = ("cifar10",) if cfg.targets == TARGETS else cfg.targets
    cfg.teacher, cfg.teacher_res, cfg.teacher_samples, cfg.teacher_limit = "efficientnet-lite0", 32, 1500, 1500
    cfg.student_res, cfg.seeds, cfg.head_steps = 32, (0, 1), 150
    cfg.test_limit, cfg.train_feature_limit = 500, 1000
    cfg.finetune_keeps, cfg.finetune_policies, cfg.finetune_epochs = (0.05,), ("lowest-energy",), 1.0
    cfg.per_class = (1, 4)
    return cfg


def get_pool(spec: str, data: str | None) -> Pool:
    """A pool by spec (`NAME` or `NAME:split,...`), built into the cache on first use."""
    name = spec.replace(":", "-").replace(",", "-")
    if (pools_dir() / name / "pool.json").is_file():
        return open_pool(name)
    return build_pool([spec], data, name=name)


def mean_std(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "runs": len(a), "values": xs}


def jpeg_bundle(images: np.ndarray, labels: np.ndarray, quality: int = 30) -> tuple[int, np.ndarray]:
    """Bytes of real images sent as JPEG + labels, Zstd-19 over the bundle; and what the receiver decodes."""
    blobs, decoded = [], []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(np.asarray(img)).save(buf, format="JPEG", quality=quality)
        blobs.append(buf.getvalue())
        decoded.append(np.asarray(Image.open(io.BytesIO(blobs[-1])).convert("RGB")))
    lengths = np.asarray([len(b) for b in blobs], dtype=np.uint32).tobytes()
    raw = lengths + np.asarray(labels, dtype=np.uint16).tobytes() + b"".join(blobs)
    return len(zstandard.ZstdCompressor(level=19).compress(raw)), np.stack(decoded)


def kcenter(feats: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy K-Center coreset (Sener & Savarese, 2018) on L2-normalised features."""
    f = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-8)
    first = int(np.random.default_rng(seed).integers(len(f)))
    chosen = [first]
    dist = np.linalg.norm(f - f[first], axis=1)
    for _ in range(1, min(k, len(f))):
        nxt = int(dist.argmax())
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(f - f[nxt], axis=1))
    return np.asarray(chosen)


def balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(out))


def int8_head(w: np.ndarray, b: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """A linear head sent as per-row int8 weights + fp16 scales and bias, Zstd-19."""
    scale = np.abs(w).max(1, keepdims=True) / 127 + 1e-12
    q = np.round(w / scale).astype(np.int8)
    raw = q.tobytes() + scale.astype(np.float16).tobytes() + b.astype(np.float16).tobytes()
    nbytes = len(zstandard.ZstdCompressor(level=19).compress(raw))
    return nbytes, q.astype(np.float32) * scale.astype(np.float16).astype(np.float32), b.astype(np.float16)


def target_teacher(target: str, cfg: Config, data: str | None,
                   holdout: Callable[[Split], tuple[Split, Split]] | None = None):
    """(source, train, test, teacher config, teacher, info), made identically by every benchmark so they
    share one cached teacher and one pool scoring per target.

    ``holdout`` (train split -> (fit rows, validation rows)): the test split is never read; ``train`` is the
    fit rows and ``test`` the validation rows, the teacher trains on the first and is measured on the second.
    Their `Split.split` names must differ from "train" and "test": feature and teacher caches key on them.
    """
    src = load_source(target, data)
    if holdout is None:
        train, test = src.split("train"), src.split("test").subset(cfg.test_limit)
    else:
        train, test = holdout(src.split("train"))
    sub_n = min(len(train), cfg.teacher_limit or len(train))
    epochs = round(min(30.0, cfg.teacher_samples / sub_n), 2)
    tcfg = TeacherConfig(model=cfg.teacher, res=cfg.teacher_res, epochs=epochs, limit=cfg.teacher_limit,
                         flip=target not in NO_FLIP)
    teacher, tinfo = train_teacher(train, test, tcfg, cache_root() / "teachers")
    return src, train, test, tcfg, teacher, tinfo


def run_target(target: str, pool: Pool, cfg: Config, data: str | None, log) -> dict:
    t0 = time.time()
    src, train, test, tcfg, teacher, tinfo = target_teacher(target, cfg, data)
    n_cls = len(train.class_names)
    flip = tcfg.flip
    log(f"[{target}] teacher {cfg.teacher}: test accuracy {tinfo['test_accuracy']:.4f} ({tinfo['train_seconds']} s)")
    scores = score_pool(teacher, pool, cache_root() / "scores")
    plabels, energy, entropy = scores.labels, scores.energy(), scores.entropy()

    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    test_f = cached_features(fm, test.images, split_key(src.root, "test", len(test)))
    trn = train.subset(cfg.train_feature_limit, seed=0)
    train_f = cached_features(fm, trn.images, split_key(src.root, "train", len(trn)))

    def linear(feats: np.ndarray, labels: np.ndarray, seed: int) -> float:
        w, b = train_head(np.asarray(feats), labels, n_cls, steps=cfg.head_steps, seed=seed)
        return accuracy(np.asarray(test_f) @ w.T + b, test.labels)

    def selection(name: str, keep: float, seed: int) -> np.ndarray:
        policy, share, alpha = POLICIES[name]
        key = select.rank_key(policy, energy, entropy, seed=seed)
        k = select.budget(len(pool), keep=keep)
        return select.select(plabels, key, k, n_cls, safety_share=share, alpha=alpha)

    def payload_bytes(idx: np.ndarray, name: str, keep: float) -> dict:
        p = payload.Payload(pool.fingerprint, len(pool), tuple(train.class_names), idx, plabels[idx])
        costs = index_costs(idx, len(pool), labels=plabels[idx], n_classes=n_cls)
        lab = len(zstandard.ZstdCompressor(level=19).compress(plabels[idx].astype(np.uint8 if n_cls <= 256
                                                                                  else np.uint16).tobytes()))
        return {"file": len(payload.encode(p)), "raw": costs["raw"], "gap_zstd": costs["gap_zstd"] + lab,
                "bitmap_zstd": costs["bitmap_zstd"] + lab}

    cells: dict[str, dict] = {}
    keeps = sorted(set(cfg.keeps) | set(cfg.policy_keeps))
    for name in POLICIES:
        for keep in keeps:
            if keep not in cfg.policy_keeps and name not in ("lowest-energy", "random"):
                continue
            accs, sizes, classes = [], None, None
            for seed in cfg.seeds:
                idx = selection(name, keep, seed)
                accs.append(linear(pool_f[idx], plabels[idx], seed))
                if sizes is None:
                    sizes = payload_bytes(idx, name, keep)
                    classes = int((select.class_histogram(plabels, idx, n_cls) > 0).sum())
            cells[f"{name}@{keep:g}"] = {"policy": name, "keep": keep, "kept": int(len(idx)), "mode": "linear",
                                        "accuracy": mean_std(accs), "bytes": sizes, "classes_kept": classes}
        log(f"[{target}] {name}: " + ", ".join(f"{c['keep']:g}→{c['accuracy']['mean']:.3f}"
                                              for c in cells.values() if c["policy"] == name))

    finetune: dict[str, dict] = {}
    for name in cfg.finetune_policies:
        for keep in cfg.finetune_keeps:
            idx = selection(name, keep, 0)
            scfg = StudentConfig(model=cfg.student, res=cfg.student_res, mode="finetune",
                                 epochs=cfg.finetune_epochs, flip=flip, seed=0)
            model = train_student(np.asarray(pool.images[idx]), plabels[idx], n_cls, scfg, progress=False)
            acc = accuracy(predict(model, test.images, progress=False), test.labels)
            finetune[f"{name}@{keep:g}"] = {"policy": name, "keep": keep, "mode": "finetune", "runs": 1,
                                           "epochs": cfg.finetune_epochs, "accuracy": acc}
            log(f"[{target}] finetune {name}@{keep:g}: {acc:.4f}")

    baselines: dict[str, list] = {"jpeg-random": [], "jpeg-kcenter": []}
    for m in cfg.per_class:
        for kind in baselines:
            accs, nbytes = [], []
            for seed in cfg.seeds:
                if kind == "jpeg-random":
                    idx = balanced(trn.labels, m, seed)
                else:
                    idx = np.sort(kcenter(np.asarray(train_f), m * n_cls, seed))
                nb, decoded = jpeg_bundle(trn.images[idx], trn.labels[idx])
                f = predict(fm, decoded, progress=False, features=True)
                accs.append(linear(f, trn.labels[idx], seed))
                nbytes.append(nb)
            baselines[kind].append({"per_class": m, "images": int(len(idx)), "bytes": int(np.mean(nbytes)),
                                    "accuracy": mean_std(accs), "mode": "linear"})
    w, b = train_head(np.asarray(train_f), trn.labels, n_cls, steps=cfg.head_steps, seed=0)
    upper = accuracy(np.asarray(test_f) @ w.T + b, test.labels)
    hb, wq, bq = int8_head(w, b)
    head = {"bytes": hb, "accuracy": accuracy(np.asarray(test_f) @ wq.T + bq, test.labels), "mode": "linear"}
    log(f"[{target}] int8 head {hb} B → {head['accuracy']:.4f}; upper bound (linear, {len(trn)} real) {upper:.4f}")
    return {
        "target": target, "classes": n_cls, "train_images": len(train), "test_images": len(test),
        "teacher": {"model": cfg.teacher, "res": cfg.teacher_res, "accuracy": tinfo["test_accuracy"],
                    "config": tinfo["config"], "train_seconds": tinfo["train_seconds"]},
        "pseudo_label_hist": np.bincount(plabels, minlength=n_cls).tolist(),
        "cells": cells, "finetune": finetune, "baselines": {**baselines, "int8-head": head},
        "upper_bound": {"mode": "linear", "train_images": len(trn), "accuracy": upper},
        "seconds": round(time.time() - t0, 1),
    }


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def acc_str(a: dict) -> str:
    return f"{pct(a['mean'])} ± {pct(a['std'])}" if a["runs"] > 1 else pct(a["mean"])


def findings(res: dict) -> list[str]:
    """Plain sentences comparing our numbers with the paper's claims, computed from the results."""
    out = []
    for t, r in res["targets"].items():
        c = r["cells"]
        le, rnd, he = (c.get(f"{p}@0.01") for p in ("lowest-energy", "random", "highest-energy"))
        if le and rnd and he:
            best = max((("lowest energy", le), ("random", rnd), ("highest energy", he)),
                       key=lambda x: x[1]["accuracy"]["mean"])
            out.append(
                f"**{t}** at 1%: lowest energy {acc_str(le['accuracy'])}, random {acc_str(rnd['accuracy'])}, highest "
                f"energy {acc_str(he['accuracy'])} (linear student, {le['accuracy']['runs']} seeds): "
                f"{best[0]} is best; lowest energy keeps {le['classes_kept']}/{r['classes']} classes."
            )
        sn = [c.get(f"safety-net a={a}@0.01") for a in ("0.5", "-0.2")]
        if le and all(sn):
            gain = max(s["accuracy"]["mean"] for s in sn) - le["accuracy"]["mean"]
            out.append(f"**{t}**: the better Safety-Net (s={SAFETY_SHARE}) at 1% is {100 * gain:+.1f} points over "
                       f"plain lowest energy ({min(s['classes_kept'] for s in sn)}+ classes kept vs "
                       f"{le['classes_kept']}).")
    return out


def write_markdown(res: dict, path: Path, plots: dict[str, str]) -> None:
    cfg = res["config"]
    L = ["# Results: the paper's experiments at our scale", "",
         f"Command: `{res['command']}` — wall time {res['wall_seconds'] / 60:.1f} min on {res['machine']}.", "",
         f"Pool: `{cfg['pool']}` ({res['pool_size']:,} images). Teacher: {cfg['teacher']} at {cfg['teacher_res']} px, "
         f"fine-tuned once per target (seed 0). Student: {cfg['student']} at {cfg['student_res']} px; **linear** = "
         f"frozen pretrained features + softmax head ({cfg['head_steps']} AdamW steps), mean ± std over "
         f"{len(cfg['seeds'])} seeds; **finetune** = full fine-tune ({cfg['finetune_epochs']:g} epochs, AdamW 1e-3, "
         "cosine), 1 run. Accuracies in % on each target's test split.", ""]
    targets = list(res["targets"])
    L += ["## 1. Student accuracy against keep ratio (lowest energy; random for reference; linear student)", "",
          "| p | " + " | ".join(f"{t} lowest-energy | {t} random" for t in targets) + " |",
          "|---|" + "---|---|" * len(targets)]
    for keep in cfg["keeps"]:
        row = [f"{keep:.0%}"]
        for t in targets:
            c = res["targets"][t]["cells"]
            row += [acc_str(c[f"{p}@{keep:g}"]["accuracy"]) if f"{p}@{keep:g}" in c else "–"
                    for p in ("lowest-energy", "random")]
        L.append("| " + " | ".join(row) + " |")
    L += ["", "## 2. Selection policies at 1% and 5% (linear student)", "",
          "| policy | " + " | ".join(f"{t} {k:.0%}" for t in targets for k in cfg["policy_keeps"]) + " |",
          "|---|" + "---|" * (len(targets) * len(cfg["policy_keeps"]))]
    for name in POLICIES:
        row = [name]
        for t in targets:
            for k in cfg["policy_keeps"]:
                c = res["targets"][t]["cells"].get(f"{name}@{k:g}")
                row.append(f"{acc_str(c['accuracy'])} ({c['classes_kept']} cl.)" if c else "–")
        L.append("| " + " | ".join(row) + " |")
    L += ["", f"Safety-Net share s = {SAFETY_SHARE}. '(n cl.)' = classes present among the kept images.", ""]
    ft = [(t, v) for t in targets for v in res["targets"][t]["finetune"].values()]
    if ft:
        L += ["Fine-tuned students (the paper's recipe, 1 run each):", "", "| target | policy | p | accuracy |",
              "|---|---|---|---|"]
        L += [f"| {t} | {v['policy']} | {v['keep']:.0%} | {pct(v['accuracy'])} |" for t, v in ft]
        L.append("")
    L += ["## 3. Payload bytes (lowest-energy selection)", "",
          "Index + labels. raw = 1 bit per pool image + ⌈log2 C⌉ bits per kept label; gap / bitmap = that index "
          "coding + Zstd-19, labels Zstd-19; file = the whole `.plada` (header, sections, checksum).", "",
          "| target | p | kept | raw | gap + Zstd-19 | bitmap + Zstd-19 | .plada file |",
          "|---|---|---|---|---|---|---|"]
    for t in targets:
        for keep in cfg["keeps"]:
            c = res["targets"][t]["cells"][f"lowest-energy@{keep:g}"]
            b = c["bytes"]
            L.append(f"| {t} | {keep:.0%} | {c['kept']:,} | {b['raw']:,} | {b['gap_zstd']:,} | {b['bitmap_zstd']:,} | "
                     f"{b['file']:,} |")
    L += ["", "## 4. Baselines at comparable bytes (linear student)", "",
          "Real target images, class-balanced random or K-Center coreset (on pretrained features), sent as JPEG "
          "quality 30 + Zstd-19; a linear head on the receiver's pretrained backbone trained on the target train "
          "split, sent as int8; upper bound: that head in float.", "",
          "| target | method | bytes | accuracy |", "|---|---|---|---|"]
    for t in targets:
        r = res["targets"][t]
        for kind in ("jpeg-random", "jpeg-kcenter"):
            for b in r["baselines"][kind]:
                L.append(f"| {t} | {kind} ({b['per_class']}/class) | {b['bytes']:,} | {acc_str(b['accuracy'])} |")
        h = r["baselines"]["int8-head"]
        L.append(f"| {t} | int8 linear head | {h['bytes']:,} | {pct(h['accuracy'])} |")
        for k in cfg["policy_keeps"]:
            c = r["cells"][f"lowest-energy@{k:g}"]
            L.append(f"| {t} | plada lowest-energy {k:.0%} | {c['bytes']['file']:,} | {acc_str(c['accuracy'])} |")
        L.append(f"| {t} | upper bound ({r['upper_bound']['train_images']:,} real, float head) | – | "
                 f"{pct(r['upper_bound']['accuracy'])} |")
    L += ["", "## 5. Teachers", "", "| target | teacher | accuracy | fine-tune seconds |", "|---|---|---|---|"]
    for t in targets:
        tt = res["targets"][t]["teacher"]
        L.append(f"| {t} | {tt['model']} @ {tt['res']} px | {pct(tt['accuracy'])} | {tt['train_seconds']} |")
    L += ["", "## Plots", ""] + [f"![{t}]({p})" for t, p in plots.items()]
    L += ["", "## What agrees with the paper, and what does not", "", "Computed from the numbers above:", ""]
    L += [f"- {s}" for s in findings(res)]
    write_keeping_discussion(path, L)


def write_keeping_discussion(path: Path, lines: list[str]) -> None:
    """Write a generated report, carrying over its hand-written discussion (everything from DISCUSSION on)."""
    old = path.read_text() if path.is_file() else ""
    if DISCUSSION in old:
        lines = [*lines, "", old[old.index(DISCUSSION):].rstrip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict, t: str, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = res["targets"][t]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, style in (("lowest-energy", "o-"), ("random", "s--")):
        cs = sorted((c for c in r["cells"].values() if c["policy"] == name), key=lambda c: c["keep"])
        ax.errorbar([c["bytes"]["file"] / 1000 for c in cs], [100 * c["accuracy"]["mean"] for c in cs],
                    yerr=[100 * c["accuracy"]["std"] for c in cs], fmt=style, label=f"plada {name}", capsize=2)
    for name in POLICIES:
        if name in ("lowest-energy", "random"):
            continue
        cs = sorted((c for c in r["cells"].values() if c["policy"] == name), key=lambda c: c["keep"])
        ax.plot([c["bytes"]["file"] / 1000 for c in cs], [100 * c["accuracy"]["mean"] for c in cs], "^:",
                label=f"plada {name}", alpha=0.8)
    for kind, style in (("jpeg-random", "x-"), ("jpeg-kcenter", "d-")):
        bs = r["baselines"][kind]
        ax.plot([b["bytes"] / 1000 for b in bs], [100 * b["accuracy"]["mean"] for b in bs], style,
                label=f"{kind} (JPEG q30)")
    h = r["baselines"]["int8-head"]
    ax.plot([h["bytes"] / 1000], [100 * h["accuracy"]], "*", ms=12, label="int8 linear head")
    ax.axhline(100 * r["upper_bound"]["accuracy"], color="grey", lw=0.8, ls="-.", label="upper bound (real data)")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("payload (KB, log scale)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{t}: accuracy vs payload (linear student)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """Options every benchmark over the paper's setting shares, so their caches line up."""
    ap.add_argument("--quick", action="store_true", help="small subset (minutes); used by the test suite")
    ap.add_argument("--data", default=None, help="dataset folder (default: $PLADA_DATA)")
    ap.add_argument("--pool", default=None, help="pool spec, NAME or NAME:split,split")
    ap.add_argument("--targets", nargs="+", default=None)
    ap.add_argument("--teacher", default=None, help="teacher backbone (default efficientnet-lite0)")
    ap.add_argument("--out-dir", default=".", help="writes results/ and benchmarks/reports/ below it")


def apply_common_args(cfg: Config, a: argparse.Namespace, quick: Callable[[Config], Config] | None = None) -> Config:
    if a.pool:
        cfg.pool = a.pool
    if a.targets:
        cfg.targets = tuple(a.targets)
    if a.teacher:
        cfg.teacher = a.teacher
    return (quick or quick_config)(cfg) if a.quick else cfg


def run_all(module: str, cfg: Config, a: argparse.Namespace, run_target: Callable, *,
            extra_flags: tuple[tuple[str, object], ...] = (), pool_info: Callable[[Pool], dict] | None = None,
            ) -> dict | None:
    """The frame every benchmark shares: its pool, each target in turn, wall time, the exact command line and
    results/<stem>.json. Returns the results, or None after printing a one-line error."""
    t0 = time.time()
    try:
        pool = get_pool(cfg.pool, a.data)
        res = {"config": asdict(cfg), "pool_size": len(pool), "pool_fingerprint": pool.fingerprint, "targets": {},
               **(pool_info(pool) if pool_info else {})}
        for t in cfg.targets:
            res["targets"][t] = run_target(t, pool, cfg, a.data, lambda s: print(s, flush=True))
    except PladaError as e:
        print(f"benchmark: error: {e}", file=sys.stderr)
        return None
    res["wall_seconds"] = round(time.time() - t0, 1)
    flags = (("--pool", a.pool), ("--targets", a.targets), ("--teacher", a.teacher), *extra_flags)
    res["command"] = f"python -m benchmarks.{module}" + (" --quick" if a.quick else "") + "".join(
        f" {flag}" if v is True or (isinstance(v, list | tuple) and not v)  # an empty list: the bare flag
        else f" {flag} {' '.join(map(str, v)) if isinstance(v, list | tuple) else v}"
        for flag, v in flags if v or (isinstance(v, list | tuple) and v is not None))
    res["machine"] = f"{platform.machine()} CPU, 2 cores" if not a.quick else platform.machine()
    return res


def merge_runs(paths: list[Path], same: Callable[[dict], object], replace: bool = False) -> dict | None:
    """One results record from runs made one target at a time (a long grid split across sessions).

    Runs must agree on ``same(run)`` (what makes their figures comparable) and on the pool, and name each
    target once (with ``replace``, a later run's target replaces an earlier one's: a re-run folded into a
    merged record); else None after a one-line error. The merged record keeps the first run's settings, every
    run's targets in the order given, their commands joined, wall times summed and the files it came from.
    """
    runs = [json.loads(p.read_text()) for p in paths]
    targets: dict[str, dict] = {}
    for r in runs:
        if same(r) != same(runs[0]) or r["pool_fingerprint"] != runs[0]["pool_fingerprint"]:
            print("benchmark: error: these runs differ in more than their targets (settings or pool)",
                  file=sys.stderr)
            return None
        for t, v in r["targets"].items():
            if t in targets and not replace:
                print(f"benchmark: error: target {t} is in more than one run", file=sys.stderr)
                return None
            targets[t] = v
    return {**runs[0], "targets": targets, "config": {**runs[0]["config"], "targets": list(targets)},
            "command": " && ".join(r["command"] for r in runs),
            "wall_seconds": round(sum(r["wall_seconds"] for r in runs), 1),
            "merged_from": [m for r, p in zip(runs, paths, strict=True) for m in r.get("merged_from", [str(p)])]}


def save_results(res: dict, out: Path, stem: str) -> Path:
    path = out / "results" / f"{stem}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, sort_keys=True, default=float))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    a = ap.parse_args(argv)
    cfg = apply_common_args(Config(), a)
    out = Path(a.out_dir)
    stem = "paper_quick" if a.quick else "paper"
    res = run_all("paper", cfg, a, run_target)
    if res is None:
        return 2
    path = save_results(res, out, stem)
    plots = {}
    for t in cfg.targets:
        rel = f"plots/{stem}_{t}.png"
        plot(res, t, out / REPORTS / rel)
        plots[t] = rel
    write_markdown(res, out / REPORTS / ("PAPER.md" if not a.quick else "PAPER_quick.md"), plots)
    print(f"wrote {path} and docs in {math.ceil(res['wall_seconds'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
