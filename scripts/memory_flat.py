"""Peak memory of pool scoring, feature extraction and selection as the pool grows (issue 18, item 3).

    python scripts/memory_flat.py --out memory_flat.json                      # N = 100k and 1M
    python scripts/memory_flat.py --sizes 2000 20000 --out /tmp/mf.json       # a quick check

Why: a pool's logits (N x C) and features (N x D) are written chunk by chunk and read back as memmaps, so
what a phase holds beyond its inputs must not grow with N except for its O(N) outputs (energy, labels,
ranks: tens of bytes per image). The pool is a folder of small synthetic JPEGs built with `plada.pool`
(`--kind folder`, nothing decoded ahead), or a memory-mapped uint8 array (`--kind npy`); the teacher is a
tiny random conv net, so decoding and bookkeeping, not the model, dominate.

Each (N, phase) runs in a fresh process. After its setup (pool opened, model built) the peak is reset
(`/proc/self/clear_refs`), then the phase runs. Reported: VmHWM (resident peak, including file pages of
memmaps read, which the kernel may drop at will), the sampled peak of anonymous memory (what cannot be
dropped), and tracemalloc's peak (Python and numpy buffers). `setup` is what the process held before
the phase (the manifest grows with N by design; see scripts/manifest_memory.py).

`select` starts from the merged logits memmap (scored in a separate process first, so its setup holds no
scoring leftovers) and keeps N/10 images with a 20% Safety-Net by lowest energy. `--select stream` (the
default) is the fixed sender's streamed selection, `Scores.select`: labels and keys a block of rows at a
time, nothing N-long held. `--select arrays` is the whole-array path (labels, energy and confidence as
N-long arrays, then `select.select`), what the auto sender needs for its decisions.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

PHASES = ("score", "features", "select")
MB = 2**20


def _status() -> dict[str, int]:
    """The process's memory counters from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class AnonPeak:
    """Peak anonymous RSS, sampled every `every` seconds on a thread (the kernel keeps no such peak)."""

    def __init__(self, every: float = 0.002) -> None:
        self.every, self.peak = every, _status()["RssAnon"]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status()["RssAnon"])
            time.sleep(self.every)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status()["RssAnon"])


def _jpeg(rng: np.random.Generator, res: int) -> bytes:
    from PIL import Image

    y, x = np.mgrid[0:res, 0:res]
    arr = rng.uniform(0, 255, 3) + (x[..., None] + y[..., None]) * rng.uniform(-4, 4, 3)
    arr = arr + rng.normal(0, 8, (res, res, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_source(work: Path, n: int, kind: str, res: int) -> Path:
    """N synthetic images on disk, written one at a time (or a block at a time): never all in memory."""
    rng = np.random.default_rng(n)
    if kind == "npy":
        path = work / f"images-{n}.npy"
        images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, res, res, 3))
        for a in range(0, n, 8192):
            images[a : a + 8192] = rng.integers(0, 256, (min(8192, n - a), res, res, 3), np.uint8)
        images.flush()
        del images
        return path
    root = work / f"jpegs-{n}"
    for i in range(n):
        if i % 1000 == 0:
            (root / f"c{i // 1000:04d}").mkdir(parents=True)
        (root / f"c{i // 1000:04d}" / f"{i:07d}.JPEG").write_bytes(_jpeg(rng, res))
    return root


def _model(classes: int, res: int):
    import torch

    from plada.backbones import Classifier

    torch.manual_seed(0)
    embed = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=2), torch.nn.GELU(), torch.nn.Conv2d(16, 32, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return Classifier(embed, 32, classes, res, "memory-flat-tiny").eval()


def _pool(work: Path, n: int, kind: str):
    from plada.pool import Pool, fingerprint_of, open_pool

    if kind == "npy":
        images = np.load(work / f"images-{n}.npy", mmap_mode="r")
        paths = [f"syn/c{i // 1000:04d}/{i:07d}.png" for i in range(n)]
        hashes = [f"{i:016x}" for i in range(n)]
        return Pool("syn", work, images, paths, hashes, fingerprint_of(paths, hashes))
    return open_pool(str(work / f"pool-{n}"), build=False, progress=False)


def child(phase: str, n: int, work: Path, kind: str, classes: int, res: int, select_path: str = "stream") -> dict:
    """One phase in this (fresh) process; returns its measurements."""
    from plada import rate, select
    from plada.features import cached_features
    from plada.pool import build_pool
    from plada.score import score_pool

    os.environ["PLADA_CACHE"] = str(work / "cache")
    t0 = time.perf_counter()
    if phase == "build":
        run = lambda: build_pool([str(work / f"jpegs-{n}")], out=work / f"pool-{n}", progress=False)  # noqa: E731
    else:
        pool, model = _pool(work, n, kind), _model(classes, res)
        if kind == "folder":
            pool.groups()  # what a sender holds anyway, outside the phase
        scores_dir = work / "cache" / "scores"
        if phase == "score":
            def run() -> None:
                score_pool(model, pool, scores_dir, progress=False)
        elif phase == "features":
            def run() -> None:
                cached_features(model, pool.images, pool.fingerprint, progress=False)
        elif select_path == "stream":
            s = score_pool(model, pool, scores_dir, progress=False)  # the merged memmap, already there

            def run() -> None:
                kept, labels = s.select("lowest-energy", n // 10, classes, safety_share=0.2)
                assert len(kept) == len(labels) == n // 10
        else:
            s = score_pool(model, pool, scores_dir, progress=False)

            def run() -> None:
                labels, en = s.labels, s.energy()
                conf = rate.confidence(s.logits)
                kept = select.select(labels, select.rank_key("lowest-energy", en), n // 10, classes,
                                     safety_share=0.2)
                assert len(kept) == n // 10 and conf.shape == (n,)
    setup_s = time.perf_counter() - t0
    before = _status()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS now, so the peak read after is the phase's
    except OSError:
        pass
    tracemalloc.start()
    t1 = time.perf_counter()
    with AnonPeak() as anon:
        run()
    seconds = time.perf_counter() - t1
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    after = _status()
    return {"n": n, "phase": phase, "kind": kind, "classes": classes, "seconds": round(seconds, 2),
            "setup_seconds": round(setup_s, 2), "setup_rss": before["VmRSS"], "setup_anon": before["RssAnon"],
            "peak_rss": after["VmHWM"], "peak_anon": anon.peak, "traced_peak": traced,
            "logits_bytes": n * classes * 4, **({"select": select_path} if phase == "select" else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="pool sizes N")
    ap.add_argument("--out", type=Path, help="JSON file for the results (required)")
    ap.add_argument("--kind", choices=("folder", "npy"), default="folder",
                    help="folder: synthetic JPEGs built as a folder pool; npy: a memory-mapped uint8 array")
    ap.add_argument("--classes", type=int, default=100, help="teacher classes C (logits are N x C float32)")
    ap.add_argument("--res", type=int, default=16, help="image and model resolution")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    ap.add_argument("--phases", nargs="+", choices=("build", *PHASES), default=None,
                    help="measure only these phases (default: all; score, features and select need build first)")
    ap.add_argument("--select", choices=("stream", "arrays"), default="stream",
                    help="select phase: stream (Scores.select, the fixed sender) or arrays (N-long labels, energy, "
                         "confidence, then select.select)")
    ap.add_argument("--child", choices=("build", *PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.n, a.work, a.kind, a.classes, a.res, a.select)))
        return
    if a.out is None:
        ap.error("--out is required")

    work = a.work or Path(tempfile.mkdtemp(prefix="memory_flat-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in a.sizes:
            t = time.perf_counter()
            make_source(work, n, a.kind, a.res)
            print(f"N={n}: synthetic {a.kind} source written in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            wanted = set(PHASES if a.phases is None else a.phases)
            needed = set(wanted) | ({"score"} if "select" in wanted else set())  # select reads the scores
            needed |= {"build"} if a.kind == "folder" and needed - {"build"} else set()
            for phase in [p for p in ("build", *PHASES) if p in needed and (p != "build" or a.kind == "folder")]:
                cmd = [sys.executable, __file__, "--child", phase, "--n", str(n), "--work", str(work),
                       "--kind", a.kind, "--classes", str(a.classes), "--res", str(a.res), "--select", a.select]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"{phase} at N={n} failed:\n{proc.stderr[-3000:]}")
                if phase in wanted or (phase == "build" and a.phases is None):
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            for p in (work / f"jpegs-{n}", work / f"pool-{n}"):  # done with: disk holds one N at a time
                shutil.rmtree(p, ignore_errors=True)
            (work / f"images-{n}.npy").unlink(missing_ok=True)
            shutil.rmtree(work / "cache", ignore_errors=True)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    command = "python scripts/memory_flat.py " + " ".join(a for a in sys.argv[1:])
    a.out.write_text(json.dumps({"command": command, "kind": a.kind, "classes": a.classes, "res": a.res,
                                 "cpus": os.cpu_count(), "rows": rows}, indent=1))
    md = [f"# Peak memory against pool size ({a.kind} pool)", "",
          f"`{command}`: one run, each (N, phase) in a fresh process; {a.classes} classes, {a.res} px, "
          f"{os.cpu_count()} CPUs. MB beyond what the process held after its setup (see the script's docstring).", "",
          "| N | phase | seconds | setup MB | resident peak − setup MB | anonymous peak − setup MB | traced MB | "
          "logits N x C MB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        phase = f"{r['phase']} ({r['select']})" if "select" in r else r["phase"]
        md.append(f"| {r['n']:,} | {phase} | {r['seconds']:.1f} | {r['setup_rss'] / MB:.1f} | "
                  f"{(r['peak_rss'] - r['setup_rss']) / MB:.1f} | {(r['peak_anon'] - r['setup_anon']) / MB:.1f} | "
                  f"{r['traced_peak'] / MB:.1f} | {r['logits_bytes'] / MB:.1f} |")
    a.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[4:]))
    print(f"results in {a.out} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
