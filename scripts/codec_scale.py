"""Scale check for the context codec on a synthetic pool shaped like ImageNet-21K.

14,197,122 images in 21,841 folders of lognormal sizes (median ~650, summing exactly), 1% kept, 1000
classes. Two selections: "clustered" (an image's energy is its folder's offset plus its own noise, so
the lowest-energy 1% concentrates in some folders, as a teacher's selection does) and "uniform" (1% at
random, the codec's worst case for grouping). Labels: mostly the folder's own class, classes Zipf-skewed.

For each: encode and decode time (one run each, this machine), peak traced memory, bytes against the
reference code length and the codec's own model length (`benchmarks.bits.ideal_bits`, `model_bits`), and
the format-1 payload (gap/bitmap + zstd-19) for comparison. Writes benchmarks/reports/codec_scale.json and prints a
table.

    python scripts/codec_scale.py [--out benchmarks/reports/codec_scale.json] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's benchmarks/, whatever the cwd

from benchmarks.bits import ideal_bits, model_bits  # noqa: E402
from plada import codec  # noqa: E402
from plada import payload as P  # noqa: E402

POOL = 14_197_122
GROUPS = 21_841
KEEP = 0.01
CLASSES = 1000
FP = hashlib.sha256(b"synthetic imagenet-21k pool").hexdigest()


def folder_sizes(rng: np.random.Generator) -> np.ndarray:
    """Lognormal folder sizes (sigma 0.6 around ~650) rescaled to sum to exactly POOL, none empty."""
    raw = rng.lognormal(np.log(650.0), 0.6, GROUPS)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * POOL)).astype(np.int64)
    short = POOL - int(sizes.sum())
    sizes[np.argsort(-raw)[: abs(short)]] += np.sign(short)  # spread the rounding over the biggest
    assert sizes.sum() == POOL and sizes.min() >= 1
    return sizes


def selection(rng: np.random.Generator, gid: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    k = int(POOL * KEEP)
    if kind == "clustered":
        energy = rng.normal(0.0, 1.5, GROUPS)[gid] + rng.normal(0.0, 1.0, POOL)
        idx = np.sort(np.argpartition(energy, k - 1)[:k])
    else:
        idx = np.sort(rng.choice(POOL, size=k, replace=False))
    major = np.minimum(rng.zipf(1.3, GROUPS) - 1, CLASSES - 1)
    other = np.minimum(rng.zipf(1.3, k) - 1, CLASSES - 1)
    labels = np.where(rng.random(k) < 0.7, major[gid[idx]], other)
    return idx.astype(np.int64), labels.astype(np.int64)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def peak_mb(fn, *args, **kwargs) -> float:
    tracemalloc.start()
    try:
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def measure(kind: str, gid: np.ndarray, groups: codec.Grouping, rng: np.random.Generator) -> dict:
    idx, labels = selection(rng, gid, kind)
    names = tuple(f"class-{i}" for i in range(CLASSES))
    p = P.Payload(FP, POOL, names, idx, labels)

    blob, encode_s = timed(codec.encode, idx, labels, POOL, CLASSES, groups)
    (got_idx, got_lab), decode_s = timed(codec.decode, blob, idx.size, POOL, CLASSES, groups)
    assert np.array_equal(got_idx, idx) and np.array_equal(got_lab, labels)
    ideal = ideal_bits(idx, labels, CLASSES, groups)
    model = model_bits(idx, labels, CLASSES, groups)

    joint_file, payload_encode_s = timed(P.encode, p, groups=gid)
    decoded, payload_decode_s = timed(P.decode, joint_file, groups=gid)
    assert decoded == p
    zstd_file, zstd_encode_s = timed(P.encode, p, codecs=("gap-zstd", "bitmap-zstd"))
    _, zstd_decode_s = timed(P.decode, zstd_file)
    zinfo = P.describe(zstd_file)
    flat_blob = codec.encode(idx, labels, POOL, CLASSES, None)

    kept = np.bincount(gid[idx], minlength=GROUPS)
    return {
        "selection": kind,
        "kept": int(idx.size),
        "groups_empty": int((kept == 0).sum()),
        "groups_full": int((kept == np.bincount(gid, minlength=GROUPS)).sum()),
        "max_kept_in_a_group": int(kept.max()),
        "distinct_labels": int(np.unique(labels).size),
        "joint_section_bytes": len(blob),
        "joint_no_groups_section_bytes": len(flat_blob),
        "ideal_bytes": ideal / 8,
        "joint_vs_ideal": len(blob) * 8 / ideal,
        "model_bytes": model["total"] / 8,
        "model_parts_bytes": {key: model[key] / 8 for key in ("positions", "labels")},
        "positions_coded_flat": model["positions_flat"],
        "label_prior": model["label_prior"],
        "coder_overhead_bytes": len(blob) - model["total"] / 8,
        "payload_bytes_joint": len(joint_file),
        "payload_bytes_zstd": len(zstd_file),
        "zstd_sections": {s["name"]: {"codec": s["codec"], "bytes": s["stored_bytes"]} for s in zinfo["sections"]},
        "joint_vs_zstd": len(joint_file) / len(zstd_file),
        "encode_s": encode_s,
        "decode_s": decode_s,
        "payload_encode_s_all_codecs": payload_encode_s,
        "payload_decode_s": payload_decode_s,
        "zstd_payload_encode_s": zstd_encode_s,
        "zstd_payload_decode_s": zstd_decode_s,
        "encode_peak_traced_mib": peak_mb(codec.encode, idx, labels, POOL, CLASSES, groups),
        "decode_peak_traced_mib": peak_mb(codec.decode, blob, idx.size, POOL, CLASSES, groups),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/reports/codec_scale.json")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    sizes = folder_sizes(rng)
    gid = np.repeat(np.arange(GROUPS), sizes)
    groups, grouping_s = timed(codec.grouping, gid, POOL)
    runs = [measure(kind, gid, groups, rng) for kind in ("clustered", "uniform")]
    report = {
        "command": "python scripts/codec_scale.py" + (f" --seed {a.seed}" if a.seed else ""),
        "pool": {
            "images": POOL,
            "groups": GROUPS,
            "group_size": {
                "min": int(sizes.min()),
                "median": float(np.median(sizes)),
                "mean": float(sizes.mean()),
                "max": int(sizes.max()),
            },
            "classes": CLASSES,
            "keep": KEEP,
            "seed": a.seed,
        },
        "grouping_s": grouping_s,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "note": "2 shared cores; times are one run each, with another job running",
        },
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "runs": runs,
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        f"pool {POOL:,} images in {GROUPS:,} folders (sizes {sizes.min()}..{sizes.max()}, "
        f"median {np.median(sizes):.0f}); grouping {grouping_s:.2f} s; max RSS {report['max_rss_mib']:.0f} MiB"
    )
    head = (
        f"{'selection':<10} {'kept':>8} {'joint B':>9} {'ideal B':>9} {'/ideal':>7} {'zstd file':>10} "
        f"{'joint file':>10} {'/zstd':>6} {'enc s':>6} {'dec s':>6} {'file dec s':>10} {'dec MiB':>8}"
    )
    print(head)
    for r in runs:
        print(
            f"{r['selection']:<10} {r['kept']:>8,} {r['joint_section_bytes']:>9,} {r['ideal_bytes']:>9,.0f} "
            f"{r['joint_vs_ideal']:>7.3f} {r['payload_bytes_zstd']:>10,} {r['payload_bytes_joint']:>10,} "
            f"{r['joint_vs_zstd']:>6.3f} {r['encode_s']:>6.2f} {r['decode_s']:>6.2f} "
            f"{r['payload_decode_s']:>10.2f} {r['decode_peak_traced_mib']:>8.0f}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
