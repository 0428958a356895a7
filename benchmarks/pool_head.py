"""How few bytes can carry a target's labelling rule when the receiver holds the pool? A head in the pool's PCA space.

    python -m benchmarks.pool_head --targets cifar10 flowers5   # results/pool_head.json, reports/POOL_HEAD.md
    python -m benchmarks.pool_head --quick                      # tiny data, seconds (the test suite runs it)

An experiment for issue 19, not (yet) a payload section. The int8-head baseline (benchmarks.paper) sends a
linear head over the receiver's public 1280-d features: 12,800 weights for 10 classes, 9.6 KB after Zstd on
CIFAR-10. But the receiver holds the whole pool, so both sides can compute the same PCA basis of the pool's
features (their mean, principal directions and spread) without sending it; a head over the first d
whitened components then costs d x C weights. The question this answers: accuracy against bytes as d and
the weight precision shrink, next to the int8 head at 1280-d and plada's label payloads.

Per target: the receiver's features (the paper benchmark's student backbone and caches), the pool's PCA
(centred, L2-normalised features, as `plada.receiver` builds its kNN graph; components whitened by the pool's
own spread and sign-fixed so both sides agree), heads fitted on the labelled target train images the
int8 head uses (`train_feature_limit`), each quantised per class row to `bits` with an fp16 scale and bias
and Zstd-19 compressed; accuracy of the dequantised head on the test split, mean over seeds. One check of
the whole-pool route: the receiver labels the pool with the d = 64, 8-bit head, keeps the most confident
share of each class and fits its own 1280-d linear student on those pool images alone.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from benchmarks import paper
from plada.data import load_source
from plada.features import cached_features, feature_model, split_key
from plada.pool import Pool
from plada.student import StudentConfig, train_student
from plada.train import accuracy, predict, train_head

DIMS = (8, 16, 32, 64, 128, 256)
BITS = (8, 4)


@dataclass
class HeadConfig(paper.Config):
    dims: tuple[int, ...] = DIMS
    bits: tuple[int, ...] = BITS
    pool_route_dim: int = 64  # the whole-pool check: this head labels the pool ...
    pool_route_share: float = 0.25  # ... and this share of each class's most confident pool images trains a student
    int8_from: str | None = "results/paper.json"
    basis_noise: float = 1e-3  # relative noise on the receiver's pool features for the basis check
    basis_check: tuple[tuple[int, int], ...] = ((64, 8), (128, 4))  # (d, bits) heads the check applies
    finetune: bool = False  # also fine-tune the receiver's own student on the route's surest pool images
    finetune_cap: int = 6000  # at most this many pool images, class-balanced (as plada.receiver.FINETUNE_CAP)
    finetune_test_limit: int | None = 2000  # as benchmarks.receiver


def quick_config(cfg: HeadConfig) -> HeadConfig:
    cfg = paper.quick_config(cfg)
    cfg.dims, cfg.bits, cfg.pool_route_dim, cfg.int8_from = (4, 16), (8, 4), 16, None
    return cfg


def pool_pca(feats: np.ndarray, chunk: int = 16384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, basis D x D, spread per component) of the pool's L2-normalised features, components by decreasing
    variance, each signed so that its largest-magnitude entry is positive: what sender and receiver both compute."""
    n, d = feats.shape
    mean = np.zeros(d, dtype=np.float64)
    for a in range(0, n, chunk):
        mean += _unit(np.asarray(feats[a:a + chunk], dtype=np.float32)).sum(0, dtype=np.float64)
    mean /= max(1, n)
    cov = np.zeros((d, d), dtype=np.float64)
    for a in range(0, n, chunk):
        x = (_unit(np.asarray(feats[a:a + chunk], dtype=np.float32)) - mean).astype(np.float64)
        cov += x.T @ x
    vals, vecs = np.linalg.eigh(cov / max(1, n))
    vals, vecs = vals[::-1], vecs[:, ::-1]
    sign = np.sign(vecs[np.abs(vecs).argmax(0), np.arange(d)])
    spread = np.sqrt(np.maximum(vals, 1e-12)).astype(np.float32)
    return mean.astype(np.float32), (vecs * sign).astype(np.float32), spread


def project(feats: np.ndarray, pca: tuple[np.ndarray, np.ndarray, np.ndarray], dim: int) -> np.ndarray:
    mean, basis, spread = pca
    return ((_unit(np.asarray(feats, dtype=np.float32)) - mean) @ basis[:, :dim]) / spread[:dim]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def quantised(w: np.ndarray, b: np.ndarray, bits: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(bytes, weights, bias) of a head sent as per-row `bits`-bit integers + fp16 scales and bias, Zstd-19.
    4-bit values are packed two per byte."""
    top = 2 ** (bits - 1) - 1
    scale = np.abs(w).max(1, keepdims=True) / top + 1e-12
    q = np.round(w / scale).astype(np.int8)
    if bits == 8:
        body = q.tobytes()
    else:
        u = (q.ravel() + top).astype(np.uint8)
        u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)])
        body = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()
    raw = body + scale.astype(np.float16).tobytes() + b.astype(np.float16).tobytes()
    nbytes = len(zstandard.ZstdCompressor(level=19).compress(raw))
    f16 = np.float16
    return nbytes, q.astype(np.float32) * scale.astype(f16).astype(np.float32), b.astype(f16).astype(np.float32)


def run_target(target: str, pool: Pool, cfg: HeadConfig, data: str | None, log) -> dict:
    t0 = time.time()
    src = load_source(target, data)
    train, test = src.split("train"), src.split("test").subset(cfg.test_limit)
    n_cls = len(train.class_names)
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, "test", len(test))))
    trn = train.subset(cfg.train_feature_limit, seed=0)
    train_f = np.asarray(cached_features(fm, trn.images, split_key(src.root, "train", len(trn))))
    pca = pool_pca(pool_f)
    cells = []
    for dim in [d for d in cfg.dims if d <= pool_f.shape[1]]:
        ztr, zte = project(train_f, pca, dim), project(test_f, pca, dim)
        for bits in cfg.bits:
            accs, nbytes = [], None
            for s in cfg.seeds:
                w, b = train_head(ztr, trn.labels, n_cls, steps=cfg.head_steps, seed=s)
                nbytes, wq, bq = quantised(w, b, bits)
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
    recv_pca = pool_pca(np.concatenate(noisy))
    del noisy
    basis_check = []
    for dim, bits in cfg.basis_check:
        if dim > pool_f.shape[1]:
            continue
        w, b = train_head(project(train_f, pca, dim), trn.labels, n_cls, steps=cfg.head_steps, seed=0)
        _, wq, bq = quantised(w, b, bits)
        same = accuracy(project(test_f, pca, dim) @ wq.T + bq, test.labels)
        other = accuracy(project(test_f, recv_pca, dim) @ wq.T + bq, test.labels)
        basis_check.append({"dim": dim, "bits": bits, "noise": cfg.basis_noise, "sender_basis": same,
                            "receiver_basis": other,
                            "max_basis_change": float(np.abs(recv_pca[1][:, :dim] - pca[1][:, :dim]).max())})
        log(f"[{target}] basis check d={dim} {bits}-bit: {same:.4f} with the sender's basis, {other:.4f} with one "
            f"from features x (1 + {cfg.basis_noise:g} N(0,1))")
    # the whole-pool route: the receiver labels its pool with one head and trains its own student on it
    route = None
    if cfg.pool_route_dim <= pool_f.shape[1]:
        dim = cfg.pool_route_dim
        w, b = train_head(project(train_f, pca, dim), trn.labels, n_cls, steps=cfg.head_steps, seed=0)
        nbytes, wq, bq = quantised(w, b, 8)
        logits = np.concatenate([project(pool_f[a:a + 16384], pca, dim) @ wq.T + bq
                                 for a in range(0, len(pool_f), 16384)])
        pred, conf = logits.argmax(1), logits.max(1) - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1))
        keep = []
        for c in range(n_cls):
            rows = np.flatnonzero((pred == c) & ~pool.missing)
            take = max(1, int(round(cfg.pool_route_share * len(rows)))) if len(rows) else 0
            keep.append(rows[np.argsort(-conf[rows], kind="stable")[:take]])
        rows = np.sort(np.concatenate(keep))
        accs = []
        for s in cfg.seeds:
            w2, b2 = train_head(np.asarray(pool_f[rows]), pred[rows], n_cls, steps=cfg.head_steps, seed=s)
            accs.append(accuracy(test_f @ w2.T + b2, test.labels))
        route = {"dim": dim, "bits": 8, "bytes": nbytes, "pool_rows": int(len(rows)),
                 "head_accuracy": accuracy(project(test_f, pca, dim) @ wq.T + bq, test.labels),
                 "student_accuracy": paper.mean_std(accs)}
        log(f"[{target}] pool route d={dim}: head {route['head_accuracy']:.4f}, student on {len(rows)} pool images "
            f"{np.mean(accs):.4f}")
        if cfg.finetune:
            t1 = time.time()
            # the surest pool images, round-robin over classes so the cap never drops a class
            per = [r[np.argsort(-conf[r], kind="stable")] for r in keep]
            order = np.array([r[i] for i in range(max(map(len, per), default=0)) for r in per if i < len(r)],
                             dtype=np.int64)
            ft_rows = np.sort(order[:cfg.finetune_cap])
            scfg = StudentConfig(model=cfg.student, res=cfg.student_res, mode="finetune", epochs=cfg.finetune_epochs,
                                 flip=target not in paper.NO_FLIP, seed=0)
            model = train_student(np.asarray(pool.images[ft_rows]), pred[ft_rows], n_cls, scfg, progress=False)
            ft_test = test.subset(cfg.finetune_test_limit, seed=0) if cfg.finetune_test_limit else test
            route["finetune"] = {"trained_on": int(len(ft_rows)), "epochs": cfg.finetune_epochs,
                                 "accuracy": accuracy(predict(model, ft_test.images, progress=False), ft_test.labels),
                                 "test_images": len(ft_test), "seconds": round(time.time() - t1, 1)}
            log(f"[{target}] pool route, fine-tuned student: {route['finetune']['accuracy']:.4f} "
                f"({route['finetune']['seconds']} s)")
    known = paper.json.loads(Path(cfg.int8_from).read_text()).get("targets", {}) if cfg.int8_from else {}
    h = known.get(target, {}).get("baselines", {}).get("int8-head")
    int8 = {"bytes": int(h["bytes"]), "accuracy": float(h["accuracy"]), "from": cfg.int8_from} if h else None
    return {"target": target, "classes": n_cls, "train_images": len(trn), "test_images": len(test),
            "feature_dim": int(pool_f.shape[1]), "cells": cells, "pool_route": route, "int8_head": int8,
            "basis_check": basis_check,
            "seconds": round(time.time() - t0, 1)}


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
    L += ["", "## The whole-pool route", "",
          "The receiver labels its pool with the head, keeps the most confident "
          f"{cfg['pool_route_share']:.0%} of each class and fits its own linear student (all feature dimensions) "
          " on those pool images only.", "",
          "*fine-tuned*: the receiver's own student (the paper benchmark's backbone, fine-tuned "
          f"{cfg['finetune_epochs']:g} epochs) on the {cfg.get('finetune_cap', 0):,} surest of those pool images, "
          "class-balanced, one run, on "
          f"{cfg.get('finetune_test_limit') or 'all'} test images (– : not run).", "",
          "| target | d | bytes | head accuracy | pool images | linear student | fine-tuned (images, s) |",
          "|---|---|---|---|---|---|---|"]
    for t, r in res["targets"].items():
        q = r["pool_route"]
        if q:
            f = q.get("finetune")
            L.append(f"| {t} | {q['dim']} | {q['bytes']:,} | {100 * q['head_accuracy']:.1f} | {q['pool_rows']:,} | "
                     f"{100 * q['student_accuracy']['mean']:.1f} ± {100 * q['student_accuracy']['std']:.1f} | "
                     + (f"{100 * f['accuracy']:.1f} ({f['trained_on']:,}, {f['seconds']:.0f} s)" if f else "–")
                     + " |")
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
    q = r.get("pool_route")
    if q:
        ax.plot([q["bytes"]], [100 * q["student_accuracy"]["mean"]], "D", c="tab:red",
                label="student on the pool the head labels (linear)")
        if q.get("finetune"):
            ax.plot([q["bytes"]], [100 * q["finetune"]["accuracy"]], "P", ms=9, c="tab:red",
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
    ap.add_argument("--finetune", action="store_true",
                    help="also fine-tune the receiver's student on the pool images the head labels (minutes each)")
    ap.add_argument("--report", metavar="JSON", help="only rewrite the report and plots from this results file")
    a = ap.parse_args(argv)
    out = Path(a.out_dir)
    stem = "pool_head_quick" if a.quick else "pool_head"
    if a.report:
        res = paper.json.loads(Path(a.report).read_text())
        write_reports(res, out, stem, a.quick)
        return 0
    cfg = paper.apply_common_args(HeadConfig(), a, quick_config)
    cfg.finetune = a.finetune
    res = paper.run_all("pool_head", cfg, a, run_target, extra_flags=(("--finetune", a.finetune),))
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
