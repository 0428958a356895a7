"""How few bytes carry a target's labelling rule when the receiver holds the pool? Receiver mode head, measured.

    python -m benchmarks.pool_head --targets cifar10 flowers5 fashion_mnist gtsrb32 \\
        --finetune-targets cifar10 flowers5 fashion_mnist gtsrb32 --finetune-budgets 1000 5000
    python -m benchmarks.pool_head --quick                      # tiny data, seconds (the test suite runs it)

The int8-head baseline (benchmarks.paper) sends a linear head over the receiver's public 1280-d features:
12,800 weights for 10 classes, 9.6 KB after Zstd on CIFAR-10. But the receiver holds the whole pool, so both
sides compute the same PCA basis of the pool's features without sending it, and a head over the first d
whitened components costs d x C weights (`plada.head`; the payload's `head` section).

Per target, with the receiver's public features (the paper benchmark's student backbone and caches):
1. *grid*: heads fitted on the labelled target train images the int8 head uses, for every width and
   precision, as whole head-only payloads (file bytes); test accuracy of the dequantised head, mean over
   seeds. A map of the trade-off, not a choice: nothing below is chosen from it.
2. *basis check*: the sender's heads applied in a basis the receiver computed from noisy pool features.
3. *the library's path, by byte budget*: `plada.head.choose` picks width and precision on held-out train
   images (never the test split), as `plada send --budget B --set receiver=head` does; the payload's file
   bytes; the head's test accuracy; then the receiver (`plada.receiver.expand("head")`) labels the pool and
   a linear student (all 1280 dims, 3 seeds) and, where asked, a fine-tuned student (1 run, the recipe and
   step bound of `plada receive`) train on those pool images alone.
The moonshot per target: the cheapest budget point whose student is within 1 point of the paper policy's best
(results/receiver.json's, else results/paper.json's), over that best's bytes.
"""

from __future__ import annotations

import argparse
import math
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
from plada.student import StudentConfig, train_student
from plada.train import accuracy, predict

DIMS = (8, 16, 32, 64, 128, 256)
BITS = (8, 4)


@dataclass
class HeadConfig(paper.Config):
    dims: tuple[int, ...] = DIMS
    bits: tuple[int, ...] = BITS
    budgets: tuple[int, ...] = (500, 1000, 2000, 5000, 10000, 20000)  # payload bytes the sender may use
    int8_from: str | None = "results/paper.json"
    best_from: str | None = "results/receiver.json"  # the paper policy's best per target (its moonshot record)
    basis_noise: float = 1e-3  # relative noise on the receiver's pool features for the basis check
    basis_check: tuple[tuple[int, int], ...] = ((64, 8), (128, 4))  # (d, bits) heads the check applies
    finetune_targets: tuple[str, ...] = ()  # fine-tune the receiver's own student on these targets ...
    finetune_budgets: tuple[int, ...] = (1000,)  # ... at these budgets (one run each)
    finetune_test_limit: int | None = 2000  # as benchmarks.receiver
    # the head's held-out rows hold out whole groups (as `plada send --set holdout_groups=`): GTSRB's 5 frames of
    # one sign would otherwise sit on both sides and inflate the forecast (as benchmarks.auto_policy)
    holdout_groups: dict[str, str] = field(default_factory=lambda: {"gtsrb32": r"^(\d+)_"})
    tolerance: float = 0.01  # the moonshot: within this of the paper policy's best


def quick_config(cfg: HeadConfig) -> HeadConfig:
    cfg = paper.quick_config(cfg)
    cfg.dims, cfg.bits, cfg.int8_from, cfg.best_from = (4, 16), (8, 4), None, None
    cfg.budgets = (400, 1000)
    return cfg


def head_payload(pool: Pool, names: tuple[str, ...], h: payload.Head, forecast: float | None) -> bytes:
    return payload.encode(payload.Payload(pool.fingerprint, len(pool), names, np.zeros(0, np.int64),
                                          np.zeros(0, np.int64), forecast=forecast, receiver="head", head=h))


def run_target(target: str, pool: Pool, cfg: HeadConfig, data: str | None, log) -> dict:
    t0 = time.time()
    src = load_source(target, data)
    train, test = src.split("train"), src.split("test").subset(cfg.test_limit)
    n_cls = len(train.class_names)
    names = tuple(train.class_names)
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, "test", len(test))))
    trn = train.subset(cfg.train_feature_limit, seed=0)
    train_f = np.asarray(cached_features(fm, trn.images, split_key(src.root, "train", len(trn))))
    pca = headmod.basis(pool_f, receiver.basis_key(pool_f))
    cells = []
    for dim in [d for d in cfg.dims if d <= pool_f.shape[1]]:
        ztr, zte = pca.project(train_f, dim), pca.project(test_f, dim)
        for bits in cfg.bits:
            accs, nbytes = [], None
            for s in cfg.seeds:
                w, b = headmod.fit(ztr, trn.labels, n_cls, seed=s)
                h = headmod.quantise(w, b, bits, cfg.student, cfg.student_res)
                nbytes = len(head_payload(pool, names, h, None))
                wq, bq = h.dequantised()
                accs.append(accuracy(zte @ wq.T + bq, test.labels))
            cells.append({"dim": dim, "bits": bits, "bytes": nbytes, "accuracy": paper.mean_std(accs)})
            log(f"[{target}] d={dim} {bits}-bit: {nbytes} B, {np.mean(accs):.4f}")
    # does the receiver need the sender's exact floats? Its features may differ in the last bits (another CPU,
    # thread count or library build): recompute the PCA from pool features perturbed by relative noise, far
    # above float32 rounding, and apply the sender's heads in that basis
    rng = np.random.default_rng(0)
    noisy = []
    for a in range(0, len(pool_f), 16384):
        x = np.asarray(pool_f[a:a + 16384], dtype=np.float32)
        noisy.append(x * (1 + cfg.basis_noise * rng.standard_normal(x.shape, dtype=np.float32)))
    recv_pca = headmod.basis(np.concatenate(noisy))
    del noisy
    basis_check = []
    for dim, bits in cfg.basis_check:
        if dim > pool_f.shape[1]:
            continue
        w, b = headmod.fit(pca.project(train_f, dim), trn.labels, n_cls, seed=0)
        wq, bq = headmod.quantise(w, b, bits, cfg.student, cfg.student_res).dequantised()
        same = accuracy(pca.project(test_f, dim) @ wq.T + bq, test.labels)
        other = accuracy(recv_pca.project(test_f, dim) @ wq.T + bq, test.labels)
        basis_check.append({"dim": dim, "bits": bits, "noise": cfg.basis_noise, "sender_basis": same,
                            "receiver_basis": other,
                            "max_basis_change": float(np.abs(recv_pca.components[:, :dim]
                                                             - pca.components[:, :dim]).max())})
        log(f"[{target}] basis check d={dim} {bits}-bit: {same:.4f} with the sender's basis, {other:.4f} with one "
            f"from features x (1 + {cfg.basis_noise:g} N(0,1))")
    # the library's path: the sender chooses on held-out train images under each budget, the receiver labels
    # its pool with the head and trains its own student on those pool images alone
    pattern = cfg.holdout_groups.get(target)
    groups = name_groups(trn.files, pattern) if pattern and trn.files is not None else None
    points = []
    for budget in cfg.budgets:
        try:
            ch = headmod.choose(train_f, trn.labels, n_cls, pca, cfg.student, cfg.student_res,
                                lambda h: len(head_payload(pool, names, h, 0.1234)), budget, seed=0, groups=groups)
        except Exception as e:  # a budget below the smallest head: recorded, not fatal
            log(f"[{target}] budget {budget} B: {e}")
            continue
        h = ch.head
        nbytes = len(head_payload(pool, names, h, ch.forecast))
        wq, bq = h.dequantised()
        head_acc = accuracy(pca.project(test_f, h.dim) @ wq.T + bq, test.labels)
        exp = receiver.expand("head", pool_f, np.zeros(0, np.int64), np.zeros(0, np.int64), n_cls,
                              allowed=~pool.missing, head=h, progress=False)
        accs = []
        for s in cfg.seeds:
            w2, b2 = receiver.fit_head(pool_f, exp, n_cls, steps=cfg.head_steps, seed=s)
            accs.append(accuracy(test_f @ w2.T + b2, test.labels))
        pt = {"budget": budget, "bytes": nbytes, "dim": h.dim, "bits": h.bits, "forecast": ch.forecast,
              "head_accuracy": head_acc, "pool_rows": int(len(exp.indices)), "linear_student": paper.mean_std(accs)}
        if target in cfg.finetune_targets and budget in cfg.finetune_budgets:
            t1 = time.time()
            scfg = StudentConfig(model=cfg.student, res=cfg.student_res, mode="finetune", flip=target not in
                                 paper.NO_FLIP, seed=0)
            e, scfg = receiver.student_recipe(exp, scfg, "head", 0, len(pool))
            rows, rl = e.training_rows(0)
            order = np.argsort(rows, kind="stable")
            model = train_student(np.asarray(pool.images[rows[order]]), rl[order], n_cls, scfg, progress=False)
            ft_test = test.subset(cfg.finetune_test_limit, seed=0) if cfg.finetune_test_limit else test
            pt["finetune"] = {"trained_on": int(len(rows)), "epochs": round(scfg.epochs, 3),
                              "accuracy": accuracy(predict(model, ft_test.images, progress=False), ft_test.labels),
                              "test_images": len(ft_test), "seconds": round(time.time() - t1, 1)}
            log(f"[{target}] budget {budget} B, fine-tuned student: {pt['finetune']['accuracy']:.4f} "
                f"({pt['finetune']['seconds']} s)")
        points.append(pt)
        log(f"[{target}] budget {budget} B: d={h.dim} {h.bits}-bit, {nbytes} B, forecast {ch.forecast:.4f}, head "
            f"{head_acc:.4f}, linear student on {len(exp.indices)} pool images {np.mean(accs):.4f}")
    known = paper.json.loads(Path(cfg.int8_from).read_text()).get("targets", {}) if cfg.int8_from else {}
    h8 = known.get(target, {}).get("baselines", {}).get("int8-head")
    int8 = {"bytes": int(h8["bytes"]), "accuracy": float(h8["accuracy"]), "from": cfg.int8_from} if h8 else None
    if int8:
        fit = [p for p in points if p["bytes"] <= int8["bytes"]]
        int8["head_mode_at_no_more_bytes"] = max(
            ({"bytes": p["bytes"], "student": p["linear_student"]["mean"], "head": p["head_accuracy"]} for p in fit),
            key=lambda x: x["student"], default=None)
    return {"target": target, "classes": n_cls, "train_images": len(trn), "test_images": len(test),
            "feature_dim": int(pool_f.shape[1]), "cells": cells, "points": points, "int8_head": int8,
            "basis_check": basis_check, "moonshot": moonshot(target, points, cfg),
            "seconds": round(time.time() - t0, 1)}


def paper_best(target: str, cfg: HeadConfig) -> dict | None:
    """The paper policy's best (bytes, accuracy) with the plain receiver: the receiver benchmark's record."""
    if cfg.best_from and Path(cfg.best_from).is_file():
        t = paper.json.loads(Path(cfg.best_from).read_text()).get("targets", {}).get(target)
        if t and t.get("moonshot", {}).get("paper_best"):
            b = t["moonshot"]["paper_best"]
            return {"bytes": int(b["bytes"]), "accuracy": float(b["accuracy"]["mean"]), "from": cfg.best_from}
    pts = label_payload_points(target, cfg.int8_from)
    if pts:
        b = max(pts, key=lambda p: (p[1], -p[0]))
        return {"bytes": b[0], "accuracy": b[1], "from": cfg.int8_from}
    return None


def moonshot(target: str, points: list[dict], cfg: HeadConfig) -> dict:
    best = paper_best(target, cfg)
    if best is None:
        return {"ratio": None, "paper_best": None, "cheapest": None}
    reach = [p for p in points if p["linear_student"]["mean"] >= best["accuracy"] - cfg.tolerance]
    cheap = min(reach, key=lambda p: p["bytes"]) if reach else None
    return {"ratio": cheap["bytes"] / best["bytes"] if cheap else None, "paper_best": best,
            "cheapest": ({"bytes": cheap["bytes"], "linear_student": cheap["linear_student"]["mean"],
                          "head": cheap["head_accuracy"]} if cheap else None)}


def write_markdown(res: dict, path: Path, plots: dict[str, str]) -> None:
    cfg = res["config"]
    L = ["# A head in the pool's PCA space: bytes against accuracy", "",
         f"Command: `{res['command']}` ({res['machine']}; {res['wall_seconds'] / 60:.1f} min; seeds {cfg['seeds']}). "
         f"Pool: {res['pool_size']:,} images; features: frozen {cfg['student']} @{cfg['student_res']} px. Heads fitted "
         f"on up to {cfg['train_feature_limit']:,} target train images ({cfg['head_steps']} steps), test accuracy of "
         "the dequantised head, mean ± std over seeds; bytes: the last seed's head (seeds differ by a byte or "
         "two). See the module docstring for the method.", "",
         "| target | d | bits | bytes | accuracy |", "|---|---|---|---|---|"]
    for t, r in res["targets"].items():
        for c in r["cells"]:
            a = c["accuracy"]
            L.append(f"| {t} | {c['dim']} | {c['bits']} | {c['bytes']:,} | "
                     f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f} |")
        if r["int8_head"]:
            L.append(f"| {t} | {r['feature_dim']} (int8 head, benchmarks.paper) | 8 | {r['int8_head']['bytes']:,} | "
                     f"{100 * r['int8_head']['accuracy']:.1f} |")
    checks = [(t, c) for t, r in res["targets"].items() for c in r.get("basis_check", [])]
    if checks:
        L += ["", "## Does the receiver need the sender's exact floats?", "",
              "The sender's head applied in a PCA basis the receiver computed from pool features multiplied by "
              "(1 + ε N(0, 1)), far above float32 rounding (seed-0 head).", "",
              "| target | d | bits | ε | sender's basis | receiver's basis | largest basis entry change |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| {t} | {c['dim']} | {c['bits']} | {c['noise']:g} | {100 * c['sender_basis']:.1f} | "
              f"{100 * c['receiver_basis']:.1f} | {c['max_basis_change']:.2g} |" for t, c in checks]
    L += ["", "## The library's path: `plada send --budget B --set receiver=head`, then `plada receive`", "",
          "Width and precision chosen by `plada.head.choose` on held-out train images (the *forecast* is that "
          "held-out accuracy); *bytes*: the whole payload file; *head*: the dequantised head on the test split; "
          "the receiver labels its pool with the head (`plada.receiver`, mode head: the surest "
          f"{receiver.HEAD_SHARE:.0%} of the pool, class-balanced) and trains its own student on those pool "
          "images alone: *linear* (1280-d, mean ± std over seeds) and *fine-tuned* (one run, "
          f"{cfg.get('finetune_test_limit') or 'all'} test images, `plada receive`'s cap and step bound; – : not run).",
          "", "| target | budget | bytes | d | bits | forecast | head | linear student | fine-tuned (images, s) |",
          "|---|---|---|---|---|---|---|---|---|"]
    for t, r in res["targets"].items():
        for q in r.get("points", []):
            f = q.get("finetune")
            L.append(f"| {t} | {q['budget']:,} | {q['bytes']:,} | {q['dim']} | {q['bits']} | "
                     f"{100 * q['forecast']:.1f} | "
                     f"{100 * q['head_accuracy']:.1f} | {100 * q['linear_student']['mean']:.1f} ± "
                     f"{100 * q['linear_student']['std']:.1f} | "
                     + (f"{100 * f['accuracy']:.1f} ({f['trained_on']:,}, {f['seconds']:.0f} s)" if f else "–") + " |")
    L += ["", "## The moonshot", "",
          "The cheapest budget point whose linear student is within "
          f"{100 * cfg.get('tolerance', 0.01):.0f} point of the paper policy's best (plain receiver, lowest energy; "
          "highest for the far-OOD target), over that best's bytes. Goal ≤ 0.1.", "",
          "| target | paper best (bytes, accuracy) | cheapest head point (bytes, linear student) | ratio |",
          "|---|---|---|---|"]
    for t, r in res["targets"].items():
        m = r.get("moonshot") or {}
        pb, ch = m.get("paper_best"), m.get("cheapest")
        L.append(f"| {t} | " + (f"{pb['bytes']:,} B, {100 * pb['accuracy']:.1f}%" if pb else "–") + " | "
                 + (f"{ch['bytes']:,} B, {100 * ch['linear_student']:.1f}%" if ch else "none within reach") + " | "
                 + (f"{m['ratio']:.3f}" if m.get("ratio") is not None else "–") + " |")
    L += ["", "## Plots", ""] + [f"![{t}]({p})" for t, p in plots.items()]
    paper.write_keeping_discussion(path, L)


def plot(r: dict, path: Path, label_points: list[tuple[int, float]] | None) -> None:
    """Accuracy against bytes: the PCA heads by precision, plada's label payloads (paper policy, plain
    receiver, from benchmarks.paper when given) and the int8 head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    for bits, style in zip(sorted({c["bits"] for c in r["cells"]}, reverse=True), ("o-", "s--", "^:"), strict=False):
        cs = [c for c in r["cells"] if c["bits"] == bits]
        ax.plot([c["bytes"] for c in cs], [100 * c["accuracy"]["mean"] for c in cs], style,
                label=f"PCA head, {bits}-bit (d = {', '.join(str(c['dim']) for c in cs)})")
    if label_points:
        xs, ys = zip(*sorted(label_points), strict=True)
        ax.plot(xs, [100 * y for y in ys], "x-", c="tab:grey", label="plada labels, paper policy (benchmarks.paper)")
    pts = r.get("points") or []
    if pts:
        ax.plot([p["bytes"] for p in pts], [100 * p["linear_student"]["mean"] for p in pts], "D-", c="tab:red",
                label="receiver mode head: linear student on the pool it labels")
        ft = [p for p in pts if p.get("finetune")]
        if ft:
            ax.plot([p["bytes"] for p in ft], [100 * p["finetune"]["accuracy"] for p in ft], "P", ms=9, c="tab:red",
                    label="same, fine-tuned student (1 run)")
    if r["int8_head"]:
        ax.plot([r["int8_head"]["bytes"]], [100 * r["int8_head"]["accuracy"]], "*", ms=12, c="tab:green",
                label="int8 head, 1280-d (benchmarks.paper)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{r['target']}: a head in the pool's PCA space against label payloads")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def label_payload_points(target: str, paper_json: str | None) -> list[tuple[int, float]] | None:
    """(file bytes, accuracy) of the paper benchmark's policy cells for this target: lowest energy, or highest for
    the far out-of-distribution target."""
    if not paper_json or not Path(paper_json).is_file():
        return None
    cells = paper.json.loads(Path(paper_json).read_text()).get("targets", {}).get(target, {}).get("cells", {})
    from benchmarks.payload_rate import FAR_OOD

    pol = "highest-energy@" if target in FAR_OOD else "lowest-energy@"
    pts = [(int(c["bytes"]["file"]), float(c["accuracy"]["mean"])) for k, c in cells.items() if k.startswith(pol)]
    return pts or None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pool_head", description=__doc__.split("\n\n")[0])
    paper.add_common_args(ap)
    ap.add_argument("--finetune-targets", nargs="*", default=None, metavar="TARGET",
                    help="also fine-tune the receiver's student at --finetune-budgets of these targets (minutes each)")
    ap.add_argument("--finetune-budgets", nargs="+", type=int, default=None, metavar="B",
                    help="budgets of the fine-tuned students (default: 1000)")
    ap.add_argument("--report", metavar="JSON", help="only rewrite the report and plots from this results file")
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    stem = "pool_head_quick" if a.quick else "pool_head"
    if a.report:
        res = paper.json.loads(Path(a.report).read_text())
        write_reports(res, out, stem, a.quick)
        return 0
    cfg = paper.apply_common_args(HeadConfig(), a, quick_config)
    if a.finetune_targets is not None:
        cfg.finetune_targets = tuple(a.finetune_targets)
    if a.finetune_budgets:
        cfg.finetune_budgets = tuple(a.finetune_budgets)
    res = paper.run_all("pool_head", cfg, a, run_target, extra_flags=(("--finetune-targets", a.finetune_targets),
                                                                      ("--finetune-budgets", a.finetune_budgets)))
    if res is None:
        return 2
    path = paper.save_results(res, out, stem)
    write_reports(res, out, stem, a.quick)
    print(f"wrote {path} in {math.ceil(res['wall_seconds'])} s")
    return 0


def write_reports(res: dict, out: Path, stem: str, quick: bool) -> None:
    plots = {}
    for t, r in res["targets"].items():
        rel = f"plots/{stem}_{t}.png"
        plot(r, out / paper.REPORTS / rel, label_payload_points(t, res["config"]["int8_from"]))
        plots[t] = rel
    write_markdown(res, out / paper.REPORTS / ("POOL_HEAD_quick.md" if quick else "POOL_HEAD.md"), plots)


if __name__ == "__main__":
    sys.exit(main())
