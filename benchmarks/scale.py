"""Scale-out measurements: scoring throughput per engine, memory against pool size, an ImageNet-21K projection.

    python -m benchmarks.scale              # tinyimagenet32: results/scale.json, benchmarks/reports/SCALE.md
    python -m benchmarks.scale --images 20000            # less work: pools of 20k and 80k images
    python -m benchmarks.scale --quick                   # synthetic, seconds (the test suite runs it)

What it measures, all on this machine:

(a) the bare backbone forward pass on the very batches the engines score (pre-loaded, pre-resized
    tensors): the limit an engine can approach;
(b) the local engine (`score.score_pool`) and (c) the Ray engine (`engines.score_pool_ray`, over
    tar shards and over the memory-mapped pool), images/s and their ratio to (a);
(d) for a pool of N images and the same pool replicated 4x (4N, distinct paths, same pixels):
    rate and peak memory of building the pool from an ImageFolder archive (decode + hash +
    manifest), of writing it as shards, of opening the sharded pool (manifest check), of streaming
    every shard, and of Ray-scoring it (driver and actors);
(e) a PROJECTION, not a measurement, of the wall time to score ImageNet-21K (14,197,122 images)
    on 8 GPUs from the measured per-image costs; without a GPU here, the inference part is the CPU
    figure divided by an assumed GPU speed-up, stated in the output.

Peak memory is per phase, in this process: Linux's high-water mark (VmHWM, reset before each
phase through /proc/self/clear_refs) minus the RSS at the phase's start, and the peak of
anonymous memory (RssAnon, sampled every 10 ms), which leaves out reclaimable file pages that
reading a memory-mapped pool maps in. Ray actors report their own peak RSS (whole process).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import platform
import shutil
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks import paper
from benchmarks.paper import write_keeping_discussion
from plada import engines
from plada.backbones import create, prepare
from plada.data import write_json_atomic
from plada.errors import PladaError
from plada.pool import Pool, build_pool, fingerprint_of, manifest_text, open_pool
from plada.score import score_pool
from plada.shards import ShardedPool, open_any, open_sharded, write_shards

IMAGENET21K = 14_197_122
GPUS = 8


# ---------------------------------------------------------------- memory


def _status() -> dict[str, int]:
    """kB fields of /proc/self/status (empty off Linux)."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


@contextmanager
def measure(row: dict, images: int):
    """Fill `row` with seconds, images/s and this phase's peak memory growth (MB)."""
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        hwm_ok = True
    except OSError:
        hwm_ok = False
    s0 = _status()
    peak = {"anon": s0.get("RssAnon", 0)}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.01):
            peak["anon"] = max(peak["anon"], _status().get("RssAnon", 0))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        yield row
    finally:
        seconds = time.perf_counter() - t0
        stop.set()
        t.join()
        s1 = _status()
        peak["anon"] = max(peak["anon"], s1.get("RssAnon", 0))
        row.update({"images": images, "seconds": round(seconds, 3),
                    "images_per_s": round(images / seconds, 1) if seconds > 0 else None})
        if s0:
            row["peak_rss_growth_mb"] = round((s1["VmHWM"] - s0["VmRSS"]) / 1024, 1) if hwm_ok else None
            row["peak_anon_growth_mb"] = round((peak["anon"] - s0.get("RssAnon", 0)) / 1024, 1)


# ---------------------------------------------------------------- pools for the measurements


def write_pool_folder(root: Path, name: str, images: np.ndarray, paths: list[str], hashes: list[str],
                      chunk: int = 4096) -> Pool:
    """A pool folder (the layout `pool.build_pool` writes) from rows already in manifest order; streamed."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = np.lib.format.open_memmap(root / "images.npy", mode="w+", dtype=np.uint8, shape=(len(paths),
                                                                                          *images.shape[1:]))
    for a in range(0, len(paths), chunk):
        b = min(a + chunk, len(paths))
        out[a:b] = images[a:b]
    out.flush()
    del out
    (root / "manifest.tsv").write_bytes(manifest_text(paths, hashes))
    np.save(root / "missing.npy", np.zeros(len(paths), bool))
    write_json_atomic(root / "pool.json", {"name": name, "sources": [], "size": len(paths), "resolution":
                                           int(images.shape[1]), "fingerprint": fingerprint_of(paths, hashes),
                                           "missing": 0, "skipped": 0})
    return open_pool(root, build=False)


class Replicated:
    """`k` copies of a pool's images, row i of copy c at c*N+i: the replicated pool's images, never in memory."""

    def __init__(self, images: np.ndarray, k: int) -> None:
        self.images, self.k, self.n = images, k, len(images)
        self.shape = (self.n * k, *images.shape[1:])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, s: slice) -> np.ndarray:
        return np.asarray(self.images[np.arange(*s.indices(len(self))) % self.n])


def replicate(pool: Pool, k: int, root: Path, name: str) -> Pool:
    """The pool `k` times over with distinct paths (`r<c>-<path>`): same pixels, a k-times bigger manifest."""
    paths = [f"r{c}-{p}" for c in range(k) for p in pool.paths]  # sorted: copies in order, each sorted
    hashes = list(pool.hashes) * k
    return write_pool_folder(root, name, Replicated(pool.images, k), paths, hashes)  # type: ignore[arg-type]


def first_rows(pool: Pool, n: int, root: Path, name: str) -> Pool:
    return write_pool_folder(root, name, pool.images, pool.paths[:n], pool.hashes[:n]) if n < len(pool) else pool


def write_source_archive(path: Path, name: str, pool: Pool, copies: int) -> None:
    """An ImageFolder archive of the pool's images (PNG) `copies` times over, as splits r0, r1, ...

    Building a pool from it measures what `plada pool build` does on real sources: decode, hash,
    sort, manifest, fingerprint, copy into the pool's array.
    """
    groups, _ = pool.groups()
    with tarfile.open(path, "w") as tar:
        for a in range(0, len(pool), 4096):
            block = np.asarray(pool.images[a : a + 4096])
            for j, img in enumerate(block):
                i = a + j
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG", compress_level=1)
                raw = buf.getvalue()
                for c in range(copies):
                    info = tarfile.TarInfo(f"{name}/r{c}/g{groups[i]:05d}/{i:08d}.png")
                    info.size = len(raw)
                    tar.addfile(info, io.BytesIO(raw))


def synthetic_pool(root: Path, n: int, res: int, seed: int = 0) -> Pool:
    """Random images in a handful of folders: the quick run's pool."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8)
    paths = sorted(f"synthetic/train/f{i % 4}/{i:06d}.png" for i in range(n))
    return write_pool_folder(root, "synthetic", images, paths, [f"{i:016x}" for i in range(n)])


# ---------------------------------------------------------------- throughput


def batches_of(n: int, chunk: int, batch_size: int) -> list[tuple[int, int]]:
    """The batches the engines score: batch_size rows at a time inside each chunk."""
    return [(b, min(b + batch_size, a + chunk, n)) for a in range(0, n, chunk) for b in range(a, min(a + chunk, n),
                                                                                           batch_size)]


@torch.inference_mode()
def bare_forward(model, images: np.ndarray, spans: list[tuple[int, int]], device: str = "cpu", warmup: int = 3,
                 repeats: int = 3) -> tuple[float, float]:
    """(forward-only seconds, prepare+forward seconds): the best of `repeats` passes over the given batches.

    Only the uint8 batches are pre-loaded (what a reader hands over); each batch is prepared just
    before its forward pass, as the engines do, so no pass runs over a giant pre-resized tensor.
    `warmup` batches first settle the allocator and the kernels' per-shape set-up.
    """
    model = model.to(device).eval()
    raw = [torch.from_numpy(np.array(images[a:b])).to(device) for a, b in spans]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for r in raw[:warmup]:
        model(prepare(r, model))
    sync()
    best_fwd = best_all = float("inf")
    for _ in range(repeats):
        fwd = 0.0
        t_all = time.perf_counter()
        for r in raw:
            x = prepare(r, model)
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            fwd += time.perf_counter() - t0
        best_fwd, best_all = min(best_fwd, fwd), min(best_all, time.perf_counter() - t_all)
    model.to("cpu")
    return best_fwd, best_all


def _ray_init(cpus: int | None):
    import ray

    if ray.is_initialized():
        return ray, False, 0.0
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    return ray, True, time.perf_counter() - t0


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict:
    out_dir = Path(args.out_dir)
    work = Path(args.work_dir or out_dir / "runs" / ("scale_quick" if args.quick else "scale"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    user_cache = os.environ.get("PLADA_CACHE")
    try:
        base = synthetic_pool(work / "base", args.images, 32) if args.quick else open_any(args.pool, args.data)
        os.environ["PLADA_CACHE"] = str(work / "cache")  # decoding is measured cold, nothing outside is touched
        return _run(args, work, base)
    finally:
        if user_cache is None:
            os.environ.pop("PLADA_CACHE", None)
        else:
            os.environ["PLADA_CACHE"] = user_cache
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, work: Path, base: Pool) -> dict:
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    res = {"config": {k: v for k, v in vars(args).items() if k != "func"}, "machine": {
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": sys.version.split()[0], "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else None}}

    n = min(args.images or len(base), len(base))
    m = min(args.score_images, n)
    print(f"pool {base.name}: {len(base)} images, using N={n} (4N={4 * n}), scoring {m} (and {4 * m} on Ray)",
          file=sys.stderr)
    model = create(args.model, args.classes, args.res, pretrained=not args.quick).eval()

    # (d) memory and rates at N and 4N
    mem: list[dict] = []
    pools: dict[int, Pool] = {}
    sharded: dict[int, ShardedPool] = {}
    src_n = first_rows(base, n, work / "pool-n", "first-n")
    for k in (1, 4):
        size = k * n
        arch = work / f"scale{k}x.tar"
        write_source_archive(arch, f"scale{k}x", src_n, k)
        row = {"phase": "pool build from ImageFolder archive (decode, hash, manifest)"}
        with measure(row, size):
            pools[k] = build_pool([str(arch)], name=f"scale{k}x", progress=False)
        mem.append(row)
        arch.unlink()
        row = {"phase": "write shards"}
        with measure(row, size):
            write_shards(pools[k], work / f"shards{k}x", shard_size=args.shard_size, progress=False)
        mem.append(row)
        row = {"phase": "open sharded pool (manifest + fingerprint check)"}
        with measure(row, size):
            sharded[k] = open_sharded(work / f"shards{k}x")
        mem.append(row)
        row = {"phase": "stream all shards (read, place by manifest, verify)"}
        with measure(row, size):
            for _ in sharded[k].iter_shards():
                pass
        mem.append(row)
        shutil.rmtree(pools[k].root)  # keep disk use to the shards
    res["memory"] = {"N": n, "4N": 4 * n, "rows": mem}

    # (a)-(c) throughput on the same M images
    tp: dict = {"images": m, "batch_size": args.batch_size, "model": args.model, "res": args.res}
    score_pool_m = first_rows(base, m, work / "pool-m", "first-m")
    shards_m = write_shards(score_pool_m, work / "shards-m", shard_size=args.shard_size, progress=False)
    chunk = engines.pool_chunk(score_pool_m)
    spans = batches_of(m, chunk, args.batch_size)
    t_fwd, t_prep_fwd = bare_forward(model, score_pool_m.images, spans, repeats=args.repeats)
    tp["bare_forward"] = {"seconds": round(t_fwd, 3), "images_per_s": round(m / t_fwd, 1)}
    tp["prepare_and_forward"] = {"seconds": round(t_prep_fwd, 3), "images_per_s": round(m / t_prep_fwd, 1)}
    if cuda:  # the Ray actors score on the GPU; the local engine (train.predict) on the CPU
        t_fwd, _ = bare_forward(model, score_pool_m.images, spans, "cuda")
        tp["bare_forward_gpu"] = {"seconds": round(t_fwd, 3), "images_per_s": round(m / t_fwd, 1)}
    row = {}
    with measure(row, m):
        score_pool(model, score_pool_m, work / "scores-local", batch_size=args.batch_size, progress=False)
    for r in range(1, args.repeats):  # best of `repeats` cold-cache runs, as for the bare forward pass
        t0 = time.perf_counter()
        score_pool(model, score_pool_m, work / f"scores-local{r}", batch_size=args.batch_size, progress=False)
        row["seconds"] = round(min(row["seconds"], time.perf_counter() - t0), 3)
    row["images_per_s"] = round(m / row["seconds"], 1)
    tp["local"] = row
    ray, started, init_s = _ray_init(args.ray_cpus)
    try:
        tp["ray_startup_seconds"] = round(init_s, 2)
        for key, pool in (("ray_shards", shards_m), ("ray_npy", score_pool_m)):
            row, st = {}, engines.RayStats()
            with measure(row, m):
                engines.score_pool_ray(model, pool, work / f"scores-{key}", actors=args.actors,
                                       batch_size=args.batch_size, progress=False, stats=st)
            row.update({"actors": st.actors, "read_s_per_image": st.read_seconds / m,
                        "steady_images_per_s": round(m * st.actors / st.actor_seconds, 1),
                        "infer_s_per_image": (st.actor_seconds - st.read_seconds) / m,
                        "actor_peak_rss_mb": [round(v / 2**20, 1) for v in st.actor_peak_rss.values()]})
            tp[key] = row
        # streaming on the Ray path: driver and actor memory at M and 4M images
        shards_4m = write_shards(replicate(score_pool_m, 4, work / "pool-4m", "first-m-x4"), work / "shards-4m",
                                 shard_size=args.shard_size, progress=False)
        for k, pool in ((1, shards_m), (4, shards_4m)):
            row, st = {"phase": "Ray scoring over shards (driver; actors below)"}, engines.RayStats()
            with measure(row, k * m):
                engines.score_pool_ray(model, pool, work / f"scores-ray-mem{k}", actors=args.actors,
                                       batch_size=args.batch_size, progress=False, stats=st)
            row["actor_peak_rss_mb"] = [round(v / 2**20, 1) for v in st.actor_peak_rss.values()]
            mem.append(row)
    finally:
        if started:
            ray.shutdown()
    for key in ("local", "ray_shards", "ray_npy"):
        bare = tp["bare_forward_gpu" if cuda and key != "local" else "bare_forward"]["images_per_s"]
        tp[key]["vs_bare_forward"] = round(tp[key]["images_per_s"] / bare, 3)
    res["throughput"] = tp
    res["projection"] = project(tp, args, cuda)
    return res


def project(tp: dict, args: argparse.Namespace, cuda: bool) -> dict:
    """PROJECTION of the ImageNet-21K wall time on 8 GPUs from the measured per-image costs.

    Per GPU, one Ray actor reads a shard and then scores it (no overlap in the current engine), so
    its per-image time is read + inference. Read time is measured here per CPU core; inference is
    measured on this machine's device. With no GPU here, GPU inference is the CPU figure divided
    by `--assume-gpu-speedup`: an assumption, not a measurement.
    """
    ray = tp["ray_shards"]
    read = ray["read_s_per_image"]
    infer_here = ray["infer_s_per_image"]
    if cuda:
        infer_gpu, basis = infer_here, "measured on this machine's GPU (one actor)"
        speedups = [1.0]
    else:
        infer_gpu = infer_here / args.assume_gpu_speedup
        basis = (f"ASSUMED: no GPU was measured; GPU inference = this machine's CPU inference time per image "
                 f"({infer_here * 1e3:.3f} ms with {tp['ray_shards']['actors']} actor(s) on {os.cpu_count()} "
                 f"cores) / {args.assume_gpu_speedup:g} (assumed GPU speed-up)")
        speedups = [10.0, args.assume_gpu_speedup, 200.0]

    def wall(infer: float) -> float:
        return IMAGENET21K * (read + infer) / GPUS + tp.get("ray_startup_seconds", 0.0)

    table = [{"assumed_gpu_speedup": s, "per_image_ms": round((read + infer_here / s) * 1e3, 4),
              "hours": round(wall(infer_here / s) / 3600, 2)} for s in speedups]
    return {"label": "PROJECTION (not measured)", "images": IMAGENET21K, "gpus": GPUS, "basis": basis,
            "read_ms_per_image_per_actor": round(read * 1e3, 4), "gpu_infer_ms_per_image": round(infer_gpu * 1e3, 4),
            "wall_hours": round(wall(infer_gpu) / 3600, 2), "sensitivity": table,
            "assumes": ["8 actors, one per GPU, each reading its own shards (shared filesystem at this read rate)",
                        "linear scaling across GPUs; teacher training, Ray start-up beyond this machine's and "
                        "selection not included",
                        f"the benchmark's model and resolution ({args.model} at {args.res} px) and batch size "
                        f"{args.batch_size}"]}


def write_markdown(res: dict, path: Path, command: str) -> None:
    tp, mem, pr = res["throughput"], res["memory"], res["projection"]
    mach = res["machine"]
    lines = [
        "# Scale-out: sharded pools and the Ray engine", "",
        f"Command: `{command}`", "",
        f"Machine: {mach['cpus']} CPU cores, torch {mach['torch']} ({mach['torch_threads']} threads), "
        f"GPU: {mach['gpu'] or 'none'}. Pool: `{'synthetic' if res['config']['quick'] else res['config']['pool']}`.",
        "", f"## Scoring throughput ({tp['images']} images, {tp['model']} at {tp['res']} px, batch {tp['batch_size']})",
        "", "| what | images/s | × bare forward |", "|---|---:|---:|",
        f"| bare forward pass, same batches (the limit) | {tp['bare_forward']['images_per_s']:.0f} | 1.00 |",
        *([f"| bare forward pass on the GPU (the Ray rows' limit) | {tp['bare_forward_gpu']['images_per_s']:.0f} "
           "| 1.00 |"] if "bare_forward_gpu" in tp else []),
        f"| resize/normalise + forward | {tp['prepare_and_forward']['images_per_s']:.0f} | "
        f"{tp['prepare_and_forward']['images_per_s'] / tp['bare_forward']['images_per_s']:.2f} |",
        f"| local engine (`score_pool`, memory-mapped pool) | {tp['local']['images_per_s']:.0f} | "
        f"{tp['local']['vs_bare_forward']:.2f} |",
        f"| Ray engine over tar shards ({tp['ray_shards']['actors']} actor(s)) | "
        f"{tp['ray_shards']['images_per_s']:.0f} | "
        f"{tp['ray_shards']['vs_bare_forward']:.2f} |",
        f"| Ray engine over the memory-mapped pool | {tp['ray_npy']['images_per_s']:.0f} | "
        f"{tp['ray_npy']['vs_bare_forward']:.2f} |", "",
        f"Ray runtime start-up ({tp['ray_startup_seconds']} s) is not in the Ray rows; each Ray row does include "
        "starting its actor pool and loading the model into it, which a small run pays in full. "
        f"Actor time per image: read {tp['ray_shards']['read_s_per_image'] * 1e3:.3f} ms, "
        f"inference {tp['ray_shards']['infer_s_per_image'] * 1e3:.3f} ms; counting actor time only (no actor "
        f"start-up), the Ray engine over shards scores {tp['ray_shards']['steady_images_per_s']:.0f} images/s.", "",
        f"## Memory against pool size (N = {mem['N']}, 4N = {mem['4N']})", "",
        "Peak growth during each phase in this process: RSS high-water mark (file pages included) and "
        "anonymous memory (what a process really needs).", "",
        "| phase | images | images/s | peak RSS growth (MB) | peak anon growth (MB) | Ray actors' peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|"]
    for r in mem["rows"]:
        lines.append(f"| {r['phase']} | {r['images']} | {r['images_per_s']:.0f} | {r.get('peak_rss_growth_mb')} | "
                     f"{r.get('peak_anon_growth_mb')} | {', '.join(map(str, r.get('actor_peak_rss_mb', []))) or ''} |")
    lines += [
        "", "What grows with N by design: the manifest (paths and hashes, about 100 B per image, held by the "
        "driver to place every image) and the logits (classes × 4 B per image). Pixels are held one shard at a "
        "time by the shard reader and by each Ray actor. `pool build` streams its source once "
        "(`plada.data.load_source`): decoded pixels go to a temporary file on disk, so what grows is file-backed "
        "page cache (RSS column), not anonymous memory.", "",
        f"## {pr['label']}: ImageNet-21K ({pr['images']:,} images) on {pr['gpus']} GPUs", "",
        f"**{pr['wall_hours']} hours** (projected). Basis: {pr['basis']}. Shard read "
        f"{pr['read_ms_per_image_per_actor']} ms per image per actor (measured here, one core), GPU inference "
        f"{pr['gpu_infer_ms_per_image']} ms per image.", "",
        "| assumed GPU speed-up over this CPU | ms per image per GPU | projected hours |", "|---:|---:|---:|"]
    lines += [f"| {t['assumed_gpu_speedup']:g} | {t['per_image_ms']} | {t['hours']} |" for t in pr["sensitivity"]]
    lines += ["", "Assumes: " + "; ".join(pr["assumes"]) + ".", ""]
    write_keeping_discussion(path, lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    p.add_argument("--pool", default="tinyimagenet32", help="pool name or folder (built from $PLADA_DATA if needed)")
    p.add_argument("--data", default=None, help="folder of dataset archives (default: $PLADA_DATA)")
    p.add_argument("--images", type=int, default=None, help="N: pool images for the memory runs (default: all)")
    p.add_argument("--score-images", type=int, default=16384, help="M: images for the throughput runs")
    p.add_argument("--shard-size", type=int, default=10000)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed passes of the local and bare-forward runs (best kept)")
    p.add_argument("--actors", type=int, default=None, help="Ray actors (default: one per GPU, else one)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray runtime (default: all)")
    p.add_argument("--assume-gpu-speedup", type=float, default=50.0,
                   help="without a GPU: assumed GPU/CPU inference speed ratio for the projection")
    p.add_argument("--out-dir", default=".", help="writes results/ and benchmarks/reports/ under this folder")
    p.add_argument("--work-dir", default=None, help="scratch folder (default: OUT_DIR/runs/scale)")
    p.add_argument("--keep-work", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny synthetic pool, random weights: checks the code path")
    args = p.parse_args(argv)
    if args.quick:
        args.images = args.images or 32
        args.score_images = min(args.score_images, 16)
        args.shard_size = min(args.shard_size, 8)
        args.res, args.classes, args.batch_size = 32, 3, 32
    try:
        res = run(args)
    except PladaError as e:
        print(f"plada: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    suffix = "_quick" if args.quick else ""
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / paper.REPORTS).mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results" / f"scale{suffix}.json", res)
    command = "python -m benchmarks.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    write_markdown(res, out / paper.REPORTS / f"SCALE{suffix}.md", command.strip())
    print(json.dumps({"throughput": {k: v.get("images_per_s") for k, v in res["throughput"].items()
                                     if isinstance(v, dict)}, "projection_hours": res["projection"]["wall_hours"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
