"""Rate against accuracy: do cheap-to-describe selections (plada.rate) and the context codec buy bytes?

    python -m benchmarks.payload_rate            # results/payload_rate.json, benchmarks/reports/PAYLOAD_RATE.md, plots
    python -m benchmarks.payload_rate --quick    # small subset (also run by the test suite)

Same pool, teachers, pool scores and frozen features as benchmarks.paper (its Config and caches are
reused). Per target, every point is a selection (indices + labels) measured two ways: its payload
bytes (the real `.plada` file, header and checksum included) and the accuracy of the paper
benchmark's linear student (frozen EfficientNet-Lite0 features + softmax head) trained on it,
mean over seeds, on the target's test split.

- The *paper front*: lowest energy at each keep size, written with the paper's codecs only
  (gap list or bitmap + Zstd-19, whichever is smaller).
- The *new front*: the same lowest-energy selections written with every codec (the context codec
  usually wins), plus the rate-aware policies of plada.rate and this module's `groups_plus_exceptions`
  over a grid of their knobs.
Goal (issue 6): some new point within 1 point of the paper front's best accuracy with at most a
tenth of that point's bytes. The ratio reported is (bytes of the paper's best) / (bytes of the
cheapest new point within 1 point of it), whatever it comes to.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import paper
from plada import payload, rate, select
from plada.data import cache_root
from plada.errors import PladaError
from plada.features import cached_features, feature_model, split_key
from plada.pool import Pool
from plada.score import score_pool
from plada.train import accuracy, train_head

FAR_OOD = {"fashion_mnist"}  # the paper keeps the highest-energy images for far out-of-distribution targets
PAPER_CODECS = ("gap-zstd", "bitmap-zstd")
LE_CTX = "lowest-energy+ctx"


@dataclass
class RateConfig(paper.Config):
    rate_keeps: tuple[float, ...] = (0.0025, 0.005, 0.01, 0.02, 0.05, 0.10, 0.25, 0.50, 1.00)
    group_counts: tuple[int, ...] = (10, 25, 50, 100, 200, 400)
    group_taus: tuple[float, ...] = (0.0, 0.5, 1.0)
    relabel_keeps: tuple[float, ...] = (0.01, 0.05, 0.25)
    relabel_taus: tuple[float, ...] = (0.5, 0.7, 0.9)
    exception_groups: tuple[int, ...] = (25, 100)
    exception_keeps: tuple[float, ...] = (0.01, 0.05)
    exception_taus: tuple[float, ...] = (0.0, 0.5)
    tolerance: float = 0.01  # "reaches the paper's best": within this much accuracy


def quick_config(cfg: RateConfig) -> RateConfig:
    cfg = paper.quick_config(cfg)
    cfg.rate_keeps, cfg.group_counts, cfg.group_taus = (0.01, 0.1, 0.5), (1, 2), (0.0, 1.0)
    cfg.relabel_keeps, cfg.relabel_taus = (0.1,), (0.7,)
    cfg.exception_groups, cfg.exception_keeps, cfg.exception_taus = (1,), (0.05,), (0.5,)
    return cfg


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both bytes (fewer) and accuracy (higher), sorted by bytes."""
    front: list[dict] = []
    for p in sorted(points, key=lambda p: (p["bytes"], -p["accuracy"]["mean"])):
        if not front or p["accuracy"]["mean"] > front[-1]["accuracy"]["mean"]:
            front.append(p)
    return front


def groups_plus_exceptions(
    labels: np.ndarray, energy: np.ndarray, groups: np.ndarray, conf: np.ndarray, n_groups: int, extra: int,
    n_classes: int, tau: float = 0.0, highest: bool = False,
) -> rate.Selection:
    """`rate.whole_groups` (majority-leaning labels) plus the ``extra`` best images outside them, labelled as is.

    The exceptions catch target-like images scattered through groups that are not worth keeping whole.
    Deterministic like the policies of plada.rate: sorted unique pool indices, one label each.
    """
    base = rate.whole_groups(labels, energy, groups, conf, n_groups, n_classes, tau, highest)
    e = np.asarray(energy, dtype=np.float64)
    if not isinstance(extra, int | np.integer) or extra < 0:
        raise PladaError(f"number of exception images must be a non-negative integer, got {extra!r}")
    outside = np.ones(e.size, dtype=bool)
    outside[base.indices] = False
    cand = np.flatnonzero(outside)
    add = cand[np.argsort(-e[cand] if highest else e[cand], kind="stable")[: int(extra)]]
    idx = np.concatenate([base.indices, add])
    lab = np.concatenate([base.labels, np.asarray(labels, dtype=np.int64)[add]])
    order = np.argsort(idx, kind="stable")
    return rate.Selection(idx[order], lab[order])

def run_target(target: str, pool: Pool, cfg: RateConfig, data: str | None, log) -> dict:
    t0 = time.time()
    src, train, test, _, teacher, tinfo = paper.target_teacher(target, cfg, data)
    n_cls, names = len(train.class_names), tuple(train.class_names)
    scores = score_pool(teacher, pool, cache_root() / "scores", progress=False)
    labels, energy, conf = scores.labels, scores.energy(), rate.confidence(scores.logits)
    gid = pool.groups()[0]
    highest = target in FAR_OOD
    fm = feature_model(cfg.student, cfg.student_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}")
    test_f = np.asarray(cached_features(fm, test.images, split_key(src.root, "test", len(test))))
    accs: dict[bytes, dict] = {}

    def measure(family: str, knobs: dict, sel: rate.Selection, codecs=None) -> dict:
        # Every family writes the same header (format 1.0 holds no policy), so bytes differ only by selection and codec.
        p = payload.Payload(pool.fingerprint, len(pool), names, sel.indices, sel.labels)
        blob = payload.encode(p, groups=gid, codecs=codecs)
        key = sel.indices.tobytes() + sel.labels.astype(np.int64).tobytes()
        if key not in accs:
            runs = []
            for seed in cfg.seeds:
                w, b = train_head(np.asarray(pool_f[sel.indices]), sel.labels, n_cls, steps=cfg.head_steps, seed=seed)
                runs.append(accuracy(test_f @ w.T + b, test.labels))
            accs[key] = paper.mean_std(runs)
        hist = np.bincount(sel.labels, minlength=n_cls)
        point = {"family": family, **knobs, "kept": int(len(sel.indices)), "bytes": len(blob),
                 "codec": payload.peek_header(blob)["sections"][0]["codec"], "accuracy": accs[key],
                 "classes_kept": int((hist > 0).sum()),
                 "relabelled": int((sel.labels != labels[sel.indices]).sum())}
        log(f"[{target}] {family} {knobs}: {point['kept']} kept, {point['bytes']} B ({point['codec']}), "
            f"acc {point['accuracy']['mean']:.4f}")
        return point

    def le(keep: float) -> rate.Selection:
        k = select.budget(len(pool), keep=keep)
        idx = select.select(labels, -energy if highest else energy, k, n_cls)
        return rate.Selection(idx, labels[idx])

    paper_pts = [measure("paper", {"keep": kp}, le(kp), codecs=PAPER_CODECS) for kp in cfg.rate_keeps]
    new_pts = [measure(LE_CTX, {"keep": kp}, le(kp)) for kp in cfg.rate_keeps]
    for m in cfg.group_counts:
        for tau in cfg.group_taus:
            sel = rate.whole_groups(labels, energy, gid, conf, m, n_cls, tau=tau, highest=highest)
            new_pts.append(measure("whole-groups", {"groups": m, "tau": tau}, sel))
    for kp in cfg.relabel_keeps:
        base = le(kp)
        for tau in cfg.relabel_taus:
            sel = rate.majority_relabel(base.indices, labels, gid, conf, tau, n_cls)
            new_pts.append(measure("majority-relabel", {"keep": kp, "tau": tau}, sel))
    for m in cfg.exception_groups:
        for kp in cfg.exception_keeps:
            extra = select.budget(len(pool), keep=kp)
            for tau in cfg.exception_taus:
                sel = groups_plus_exceptions(labels, energy, gid, conf, m, extra, n_cls, tau=tau, highest=highest)
                new_pts.append(measure("groups+exceptions", {"groups": m, "extra_keep": kp, "tau": tau}, sel))

    best = max(paper_pts, key=lambda p: (p["accuracy"]["mean"], -p["bytes"]))
    reach = [p for p in new_pts if p["accuracy"]["mean"] >= best["accuracy"]["mean"] - cfg.tolerance]
    cheapest = min(reach, key=lambda p: (p["bytes"], -p["accuracy"]["mean"])) if reach else None
    ratio = best["bytes"] / cheapest["bytes"] if cheapest else None
    # Equal-bytes view: the best new accuracy at no more bytes than each paper point.
    at_equal = []
    for p in paper_pts:
        fits = [q for q in new_pts if q["bytes"] <= p["bytes"]]
        q = max(fits, key=lambda q: q["accuracy"]["mean"]) if fits else None
        at_equal.append({"keep": p["keep"], "paper_bytes": p["bytes"], "paper_accuracy": p["accuracy"]["mean"],
                         "new_accuracy": q["accuracy"]["mean"] if q else None, "new_point": q})
    log(f"[{target}] paper best {best['accuracy']['mean']:.4f} at {best['bytes']} B; "
        f"ratio {'none' if ratio is None else f'{ratio:.2f}'}")
    return {
        "target": target, "classes": n_cls, "far_ood": highest,
        "teacher": {"model": cfg.teacher, "res": cfg.teacher_res, "accuracy": tinfo["test_accuracy"]},
        "paper_points": paper_pts, "new_points": new_pts,
        "paper_front": pareto(paper_pts), "new_front": pareto(new_pts),
        "paper_best": best, "cheapest_within_tolerance": cheapest, "bytes_ratio": ratio,
        "goal_met": bool(ratio is not None and ratio >= 10), "at_equal_bytes": at_equal,
        "seconds": round(time.time() - t0, 1),
    }


FAMILY_STYLE = {
    "lowest-energy+ctx": ("tab:blue", "o"),
    "whole-groups": ("tab:green", "s"),
    "majority-relabel": ("tab:orange", "^"),
    "groups+exceptions": ("tab:purple", "D"),
}


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6))
    pf = r["paper_front"]
    ax.plot([p["bytes"] for p in pf], [100 * p["accuracy"]["mean"] for p in pf], "k-", lw=1.5, marker="x",
            label="paper: lowest energy + Zstd-19 (front)")
    for fam, (colour, marker) in FAMILY_STYLE.items():
        pts = [p for p in r["new_points"] if p["family"] == fam]
        if pts:
            ax.scatter([p["bytes"] for p in pts], [100 * p["accuracy"]["mean"] for p in pts], c=colour, marker=marker,
                       s=22, alpha=0.8, label=fam)
    nf = r["new_front"]
    ax.plot([p["bytes"] for p in nf], [100 * p["accuracy"]["mean"] for p in nf], "r--", lw=1, label="new front")
    best = r["paper_best"]
    ax.axhline(100 * best["accuracy"]["mean"] - 1, color="grey", lw=0.7, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("payload bytes (.plada file, log scale)")
    ax.set_ylabel("linear student test accuracy (%)")
    ax.set_title(f"{r['target']}: rate vs accuracy (dotted: paper best - 1 pt)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _knobs(p: dict) -> str:
    skip = {"family", "kept", "bytes", "codec", "accuracy", "classes_kept", "relabelled"}
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items() if k not in skip)


def write_markdown(res: dict, path: Path, plots: dict[str, str], codec_scale: dict | None) -> None:
    cfg = res["config"]
    seeds = len(cfg["seeds"])
    lines = [
        "# Rate against accuracy: cheap-to-describe selections and the context codec",
        "",
        f"Command: `{res['command']}` ({res['machine']}; {res['wall_seconds'] / 60:.1f} min). Pool: "
        f"{res['pool_size']:,} images in {res['pool_groups']} folders. Accuracy: linear student (frozen "
        f"EfficientNet-Lite0 @{cfg['student_res']} px + softmax head, {cfg['head_steps']} steps), mean of "
        f"{seeds} seeds on the test split. Bytes: the whole `.plada` file. Paper = lowest energy "
        "(highest for the far-OOD target) with gap/bitmap + Zstd-19; every other point may use any codec.",
        "",
        "## Goal: the paper's best accuracy (within 1 point) in a tenth of its bytes",
        "",
        "| target | paper best | its bytes | cheapest new point within 1 pt | its bytes | ratio | goal (>= 10x) |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, r in res["targets"].items():
        b, c = r["paper_best"], r["cheapest_within_tolerance"]
        cname = f"{c['family']} ({_knobs(c)}): {100 * c['accuracy']['mean']:.1f}" if c else "none"
        ratio = f"{r['bytes_ratio']:.2f}x" if r["bytes_ratio"] else "-"
        lines.append(f"| {t} | {100 * b['accuracy']['mean']:.1f} (keep {b['keep']:g}) | {b['bytes']:,} | {cname} | "
                     f"{c['bytes'] if c else 0:,} | {ratio} | {'met' if r['goal_met'] else 'not met'} |")
    lines += ["", "## At equal bytes: the best new point that is no larger than each paper point", ""]
    for t, r in res["targets"].items():
        lines += [f"### {t}", "", "| paper keep | paper bytes | paper acc | best new acc at <= bytes | that point |",
                  "|---|---|---|---|---|"]
        for e in r["at_equal_bytes"]:
            q = e["new_point"]
            desc = f"{q['family']} ({_knobs(q)}), {q['bytes']:,} B" if q else "-"
            na = f"{100 * e['new_accuracy']:.1f}" if e["new_accuracy"] is not None else "-"
            lines.append(f"| {e['keep']:g} | {e['paper_bytes']:,} | {100 * e['paper_accuracy']:.1f} | {na} | {desc} |")
        lines.append("")
    lines += ["## Every point", ""]
    for t, r in res["targets"].items():
        lines += [f"### {t} (teacher {100 * r['teacher']['accuracy']:.1f}%)", "", f"![{t}]({plots[t]})", "",
                  "| family | knobs | kept | classes | relabelled | bytes | codec | accuracy |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in r["paper_points"] + r["new_points"]:
            a = p["accuracy"]
            lines.append(f"| {p['family']} | {_knobs(p)} | {p['kept']:,} | {p['classes_kept']} | {p['relabelled']:,} | "
                         f"{p['bytes']:,} | {p['codec']} | {100 * a['mean']:.1f} ± {100 * a['std']:.1f} |")
        lines.append("")
    if codec_scale:
        pool = codec_scale["pool"]
        lines += ["## Scale: a pool shaped like ImageNet-21K", "",
                  f"`{codec_scale.get('command', 'python scripts/codec_scale.py')}` "
                  "(benchmarks/reports/codec_scale.json): "
                  f"{pool['images']:,} images in {pool['groups']:,} groups (sizes {pool['group_size']['min']}–"
                  f"{pool['group_size']['max']}, median {pool['group_size']['median']:g}), {pool['classes']} classes, "
                  f"{pool['keep']:g} kept; {codec_scale['machine'].get('note', '')}. Peak RSS of the whole run "
                  f"{codec_scale['max_rss_mib']:.0f} MiB.", "",
                  "| selection | kept | .plada (context codec) | .plada (Zstd-19) | encode s | decode s | "
                  "decode peak MiB |", "|---|---|---|---|---|---|---|"]
        for r in codec_scale["runs"]:
            lines.append(f"| {r['selection']} | {r['kept']:,} | {r['payload_bytes_joint']:,} | "
                         f"{r['payload_bytes_zstd']:,} | {r['payload_encode_s_all_codecs']:.2f} | "
                         f"{r['payload_decode_s']:.2f} | {r['decode_peak_traced_mib']:.0f} |")
        lines.append("")
    paper.write_keeping_discussion(path, lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.payload_rate", description=__doc__.split("\n\n")[0])
    paper.add_common_args(ap)
    a = ap.parse_args(argv)
    cfg = paper.apply_common_args(RateConfig(), a, quick_config)
    out = Path(a.out_dir)
    stem = "payload_rate_quick" if a.quick else "payload_rate"
    res = paper.run_all("payload_rate", cfg, a, run_target,
                        pool_info=lambda pool: {"pool_groups": len(pool.groups()[1])})
    if res is None:
        return 2
    path = paper.save_results(res, out, stem)
    plots = {}
    for t, r in res["targets"].items():
        rel = f"plots/{stem}_{t}.png"
        plot(r, out / paper.REPORTS / rel)
        plots[t] = rel
    scale_path = Path("benchmarks/reports/codec_scale.json")
    codec_scale = json.loads(scale_path.read_text()) if scale_path.is_file() and not a.quick else None
    write_markdown(res, out / paper.REPORTS / ("PAYLOAD_RATE.md" if not a.quick else "PAYLOAD_RATE_quick.md"), plots,
                   codec_scale)
    print(f"wrote {path} and docs in {math.ceil(res['wall_seconds'])} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
