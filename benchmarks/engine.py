"""Does plada keep up with the bare model at the paper's resolution, reading a folder of full-resolution JPEGs?

    python -m benchmarks.engine            # results/engine.json, benchmarks/reports/ENGINE.md
    python -m benchmarks.engine --quick    # a few batches at 96 px (what the test suite runs)

A folder pool of every Flowers-5 JPEG (about 240x320; 4,317 files, extracted once from the shared archive),
topped up to 5,000 files with synthetic photo-like JPEGs of the same size (`--min-files`), is read at 224 px
by EfficientNet-Lite0 (ImageNet weights) on this machine's CPU:

- scoring: `score.score_pool` on the folder pool (files read, hashed, decoded at 224 in threads, prefetched,
  then the forward) against the bare forward of the same images already decoded, normalised and in memory;
- training: `train.fit` on the folder pool (random batches, each image a random-resized crop of its full file
  and a flip, decoded on the fly; AdamW, schedule) against a bare forward+backward+AdamW step on batches
  already in memory.

Rounds alternate bare and plada measurements (odd rounds plada first) so a machine shared with other work,
or drifting, slows both alike; each figure is the median over rounds, and the ratios' range over rounds is
kept beside it. The manifest figure opens a synthetic 14.2M-line manifest (ImageNet-21K's
size, paths and hashes as plada writes them) in a fresh process and reads its resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from plada import backbones, score
from plada.data import cache_root, data_root
from plada.pool import build_pool
from plada.train import fit

ROOT = Path(__file__).resolve().parents[1]
MANIFEST_LINES = 14_197_122  # ImageNet-21K (winter 2021), as the paper's pool

RSS_CHILD = r"""
import sys
from plada.pool import read_manifest
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
paths, hashes, raw = read_manifest(sys.argv[1])
assert len(paths) == int(sys.argv[2]) and paths[len(paths) // 2] and hashes[-1]
# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over exec from the forking parent (this benchmark,
# gigabytes of models), which read as a 4.3 GB peak; VmHWM belongs to this process's own address space
print(status("VmRSS"), before, status("VmHWM"))
"""


def jpeg_folder(data: Path, min_files: int = 0) -> Path:
    """Every Flowers-5 JPEG (train and test) in one `<class>/<split>_<file>` folder, made once in the cache,
    plus synthetic 320x240 photo-like JPEGs in `synthetic/` up to ``min_files`` files.

    Why flattened: a `split/class/file` tree is a dataset to plada (decoded into its cache), while a pool a user
    holds is one folder of class folders, as ImageNet's `train/<wnid>/<file>.JPEG`.
    """
    out = cache_root() / "bench" / (f"flowers5-jpeg-{min_files}" if min_files else "flowers5-jpeg")
    done = out / ".complete"
    if not done.exists():
        n = 0
        with tarfile.open(data / "flowers5.tar.xz") as tar:
            for m in tar.getmembers():
                parts = Path(m.name).parts  # flowers5/<split>/<class>/<file>
                if m.isfile() and len(parts) == 4:
                    dest = out / "pool" / parts[2] / f"{parts[1]}_{parts[3]}"
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(m).read())
                    n += 1
        rng = np.random.default_rng(0)
        (out / "pool" / "synthetic").mkdir(parents=True, exist_ok=True)
        for i in range(max(0, min_files - n)):
            (out / "pool" / "synthetic" / f"synthetic_{i:05d}.jpg").write_bytes(photo_like_jpeg(rng, 320, 240))
        done.write_text("ok\n")
    return out / "pool"


def photo_like_jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A JPEG that compresses and decodes like a photo: a random colour gradient plus noise (quality 90)."""
    import io

    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = rng.uniform(0, 255, 3) + x[..., None] * rng.uniform(-0.6, 0.6, 3) + y[..., None] * rng.uniform(-0.6, 0.6, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)).save(buf, "JPEG",
                                                                                                quality=90)
    return buf.getvalue()


def manifest_rss(lines: int) -> dict:
    """Resident memory of an opened `lines`-entry manifest, measured in a fresh interpreter."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.tsv"
        with open(path, "wb") as f:  # wnid/wnid_NUMBER.JPEG<TAB>16 hex: plada's own line shape
            for a in range(0, lines, 1_000_000):  # sorted, as every manifest is
                f.write("".join(f"n{j // 650:08d}/n{j // 650:08d}_{j:08d}.JPEG\t{j * 2654435761 % 2**64:016x}\n"
                                for j in range(a, min(lines, a + 1_000_000))).encode())
        size = path.stat().st_size
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), str(lines)], check=True,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        seconds = time.perf_counter() - t
    rss, before, peak = map(int, out.stdout.split())
    return {"lines": lines, "file_bytes": size, "rss_bytes": rss, "rss_before_bytes": before, "peak_rss_bytes": peak,
            "open_seconds": round(seconds, 1)}


def median_rate(samples: list[float]) -> float:
    return round(statistics.median(samples), 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="96 px, a few batches, no 14.2M manifest")
    ap.add_argument("--data", default=None, help="folder of dataset archives (default: $PLADA_DATA)")
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--score-images", type=int, default=1024, help="images scored per round")
    ap.add_argument("--train-steps", type=int, default=12, help="training steps per round")
    ap.add_argument("--min-files", type=int, default=5000,
                    help="top the Flowers-5 folder up with synthetic JPEGs to this many files")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "engine.json")
    a = ap.parse_args(argv)
    if a.quick:
        a.res, a.batch, a.rounds, a.score_images, a.train_steps = 96, 16, 2, 64, 3
    t0 = time.time()
    folder = jpeg_folder(data_root(a.data), 0 if a.quick else a.min_files)
    pool = build_pool([str(folder)], name="bench-flowers5-jpeg", progress=not a.quick)
    n = min(a.score_images, len(pool))
    model = backbones.create("efficientnet-lite0", 5, a.res, pretrained=True).eval()
    view = pool.images_at(a.res)
    decoded = np.asarray(view[:n])  # the bare runs' input: decoded once, outside every timer
    xs = [backbones.prepare(torch.from_numpy(decoded[i : i + a.batch].copy()), model) for i in range(0, n, a.batch)]
    labels = np.arange(len(pool)) % 5
    bare_f, plada_f, bare_t, plada_t = [], [], [], []
    with torch.inference_mode():  # warm-up: first-call allocations and kernel choices stay out of round 0
        model(xs[0])
    fit(backbones.create("efficientnet-lite0", 5, a.res, pretrained=True), decoded, labels[:n], epochs=a.batch / n,
        batch_size=a.batch, progress=False)
    def bare_forward() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for x in xs:
                model(x)
        return n / (time.perf_counter() - t)

    def scoring() -> float:
        sub = _subpool(pool, n)
        with tempfile.TemporaryDirectory() as cache:
            t = time.perf_counter()
            got = score.score_pool(model, sub, Path(cache), batch_size=a.batch, progress=False)
            rate = n / (time.perf_counter() - t)
        assert got.logits.shape == (n, 5)
        return rate

    def bare_step() -> float:
        net = backbones.create("efficientnet-lite0", 5, a.res, pretrained=True)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        y = torch.from_numpy(labels[: a.batch])
        net.train()
        t = time.perf_counter()
        for s in range(a.train_steps):
            loss = F.cross_entropy(net(xs[s % len(xs)]), y[: len(xs[s % len(xs)])])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return a.train_steps * a.batch / (time.perf_counter() - t)

    def fitting(r: int) -> float:
        net = backbones.create("efficientnet-lite0", 5, a.res, pretrained=True)
        rows = a.train_steps * a.batch
        t = time.perf_counter()
        fit(net, view, labels, epochs=rows / len(pool), batch_size=a.batch, seed=r, progress=False)
        return rows / (time.perf_counter() - t)

    for r in range(a.rounds):  # odd rounds measure plada first: a drifting machine favours neither side
        first = r % 2 == 0
        for bare, mine, fb, fp in ((bare_forward, scoring, bare_f, plada_f),
                                   (bare_step, lambda r=r: fitting(r), bare_t, plada_t)):
            if first:
                fb.append(bare())
            fp.append(mine())
            if not first:
                fb.append(bare())
        print(f"round {r}: forward {bare_f[-1]:.1f} img/s, scoring {plada_f[-1]:.1f}; "
              f"bare step {bare_t[-1]:.1f} img/s, fit {plada_t[-1]:.1f}", flush=True)
    ratios = {"scoring": [p / b for p, b in zip(plada_f, bare_f, strict=True)],
              "training": [p / b for p, b in zip(plada_t, bare_t, strict=True)]}
    result = {
        "command": " ".join(["python -m benchmarks.engine", *(sys.argv[1:] if argv is None else argv)]),
        "resolution": a.res, "model": "efficientnet-lite0 (ImageNet weights)", "device": "cpu",
        "pool": {"files": len(pool), "source": "flowers5 JPEGs, full resolution (~240x320)" + (
                     f", topped up to {a.min_files} with synthetic 320x240 JPEGs" if a.min_files and not a.quick
                     else ""),
                 "decoded_copy": False, "fingerprint": pool.fingerprint},
        "batch": a.batch, "rounds": a.rounds, "score_images_per_round": n, "train_steps_per_round": a.train_steps,
        "forward_img_s": median_rate(bare_f), "scoring_img_s": median_rate(plada_f),
        "train_step_img_s": median_rate(bare_t), "fit_img_s": median_rate(plada_t),
        "scoring_vs_forward": round(statistics.median(ratios["scoring"]), 3),
        "training_vs_forward": round(statistics.median(ratios["training"]), 3),
        "ratio_range": {k: [round(min(v), 3), round(max(v), 3)] for k, v in ratios.items()},
        "augmentation": "random-resized crops of each full file (images.RRC_SCALE, RRC_RATIO) and flips",
        "samples": {"forward": bare_f, "scoring": plada_f, "train_step": bare_t, "fit": plada_t},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_average": list(os.getloadavg())},
    }
    if not a.quick:
        m = manifest_rss(MANIFEST_LINES)
        result["manifest"] = m
        result["manifest_rss_gb_14m"] = round(m["rss_bytes"] / 1e9, 3)
    result["wall_seconds"] = round(time.time() - t0, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    if not a.quick:
        _report(result, ROOT / "benchmarks" / "reports" / "ENGINE.md")
    print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "machine")}, indent=1))
    return 0


def _subpool(pool, n: int):
    """The folder pool's first ``n`` files as a pool of their own: the same reads, a round's worth of them."""
    from dataclasses import replace

    from plada.images import FolderFiles, LazyImages

    src = pool.images.source
    head = LazyImages(FolderFiles(src.root, list(src.paths[:n])), pool.images.res, list(pool.hashes[:n]))
    return replace(pool, images=head, paths=list(pool.paths[:n]), hashes=list(pool.hashes[:n]),
                   missing=pool.missing[:n], _groups=None)


def _report(r: dict, path: Path) -> None:
    lines = [
        "# The engine at 224 px on this CPU", "",
        f"`{r['command']}`: a folder pool of {r['pool']['files']} files ({r['pool']['source']}; no decoded copy), "
        f"{r['model']}, batch {r['batch']}, {r['rounds']} alternating rounds (images/s: medians; ratios: median of "
        "the rounds' ratios, their range in brackets); training reads " + r["augmentation"] + "; "
        f"{r['machine']['cpus']} CPUs, torch {r['machine']['torch']}, load average at the end "
        f"{r['machine']['load_average'][0]:.1f}.", "",
        "| path | images/s | vs the bare model |", "|---|---|---|",
        f"| bare forward (decoded, normalised, in memory) | {r['forward_img_s']} | 1 |",
        f"| `score.score_pool` from the JPEG files | {r['scoring_img_s']} | {r['scoring_vs_forward']} "
        f"[{r['ratio_range']['scoring'][0]}, {r['ratio_range']['scoring'][1]}] |",
        f"| bare forward+backward+AdamW (in memory) | {r['train_step_img_s']} | 1 |",
        f"| `train.fit` from the JPEG files | {r['fit_img_s']} | {r['training_vs_forward']} "
        f"[{r['ratio_range']['training'][0]}, {r['ratio_range']['training'][1]}] |", "",
    ]
    if "manifest" in r:
        m = r["manifest"]
        lines.append(f"An opened {m['lines']:,}-entry manifest ({m['file_bytes'] / 1e9:.2f} GB on disk): "
                     f"{m['rss_bytes'] / 1e9:.2f} GB resident (peak {m['peak_rss_bytes'] / 1e9:.2f} GB).")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
