"""Where pool scoring runs: `local` (this process, `score.score_pool`) or `ray` (an actor pool).

Why Ray: scoring is the sender's one step that grows with the pool (ImageNet-21K: 14.2M images),
and it is embarrassingly parallel by shard. The Ray engine runs Ray Data over the pool's work
units (one tar shard of a sharded pool, one chunk of a memory-mapped pool, or one chunk of rows of a
folder or WebDataset pool) with an actor pool in which every actor holds the teacher once (one actor per
GPU when the cluster has them). Each actor reads its unit itself: a folder or shard pool is opened once
per actor from its manifest, and the actor decodes its own rows' files at the teacher's input size,
streamed batch by batch into the forward pass. So no pixels pass through the driver and every process
holds at most one unit's logits and a few batches of images, whatever the pool size.

Both engines write the same files: logits per unit, atomically, in `score.score_dir`, with unit
boundaries equal to the local engine's chunks (a sharded pool's chunk is its shard size). So a
killed Ray run resumes unit by unit, a run on a cluster is reused by a later local `send`, and the
merge is the local engine's: units concatenated in manifest order, whatever order they finished
in. Results agree with the local engine to float tolerance (actors may use other thread counts or
a GPU), which leaves labels and energy ranks, and so payloads, unchanged in practice.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .backbones import Classifier, create
from .data import atomic_save_npy
from .errors import PladaError
from .images import LazyImages
from .pool import Pool
from .score import (
    Scores,
    chunk_bounds,
    chunk_path,
    chunk_size,
    load_chunk,
    load_merged,
    merge_chunks,
    score_dir,
    score_pool,
)
from .shards import ShardedPool, manifest_slice, read_shard
from .train import predict

ENGINES = ("local", "ray")


def pool_chunk(pool: Pool) -> int:
    """Rows per scoring unit: a sharded pool's shard size (one read per unit), else `score.chunk_size()`."""
    return pool.shard_size if isinstance(pool, ShardedPool) else chunk_size()


def score(
    model: Classifier, pool: Pool, cache: Path, engine: str = "local", batch_size: int = 256, progress: bool = True,
    actors: int | None = None, device: torch.device | str | None = None,
) -> Scores:
    """Teacher logits for the whole pool on the chosen engine; both resume from the same chunk files.

    ``device`` is the local engine's (None: the CPU); Ray actors each take a GPU of the cluster when it has
    them, whatever this process uses."""
    if engine == "local":
        return score_pool(model, pool, cache, batch_size=batch_size, progress=progress, chunk=pool_chunk(pool),
                          device=device)
    if engine == "ray":
        return score_pool_ray(model, pool, cache, actors=actors, batch_size=batch_size, progress=progress)
    raise PladaError(f"unknown engine '{engine}' (have: {', '.join(ENGINES)})")


def check_engine(engine: str) -> None:
    """Refuse an unknown or uninstalled engine before hours of teacher training."""
    if engine not in ENGINES:
        raise PladaError(f"unknown engine '{engine}' (have: {', '.join(ENGINES)})")
    if engine == "ray":
        _ray()


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise PladaError("the ray engine needs Ray Data: pip install 'plada[ray]'") from None
    return ray


@dataclass(frozen=True)
class Unit:
    """Rows `[start, stop)` of the pool and where an actor reads their pixels from."""

    start: int
    stop: int
    kind: str  # "shard": a tar shard; "npy": a memory-mapped images.npy; "object": an object-store array;
    # "files": rows of a folder or WebDataset pool, `file` its pool folder, `manifest` its fingerprint
    file: str = ""
    count: int = 0  # shard: rows it holds
    manifest: str = ""  # shard: the manifest, and the byte offset of this unit's first line in it
    offset: int = 0
    ref: object = None  # object: the ObjectRef of the rows


def units_of(pool: Pool, chunk: int, put=None) -> list[Unit]:
    """Work units covering the pool in manifest order, each readable by any worker on its own."""
    n = len(pool)
    if isinstance(pool, ShardedPool):
        return [Unit(s.start, s.stop, "shard", str((pool.root / s.file).resolve()), s.count,
                     str((pool.root / "manifest.tsv").resolve()), s.offset) for s in pool.shards]
    images = pool.images
    if isinstance(images, LazyImages):  # the user's own files: each actor opens the pool and decodes its rows
        root = str(Path(pool.root).resolve())
        return [Unit(a, min(a + chunk, n), "files", root, manifest=pool.fingerprint) for a in range(0, n, chunk)]
    file = getattr(images, "filename", None) if isinstance(images, np.memmap) else None
    if file and np.load(file, mmap_mode="r").shape == images.shape:  # the whole file, not a slice of it
        return [Unit(a, min(a + chunk, n), "npy", str(Path(file).resolve())) for a in range(0, n, chunk)]
    if put is None:
        raise PladaError("an in-memory pool needs a Ray runtime to ship its images")
    return [Unit(a, min(a + chunk, n), "object", ref=put(np.ascontiguousarray(images[a : a + chunk])))
            for a in range(0, n, chunk)]


_OPENED: dict[tuple[str, str], LazyImages] = {}  # per worker process: a files pool opened once per fingerprint


def files_view(u: Unit, res: int) -> LazyImages:
    """The files pool of a "files" unit at `res`, opened by this worker once and checked to be the driver's.

    Keyed by folder and fingerprint: a long-lived worker given the same folder after a rebuild opens it again."""
    images = _OPENED.get((u.file, u.manifest))
    if images is None:
        from .pool import open_pool

        pool = open_pool(u.file, build=False, progress=False)
        if pool.fingerprint != u.manifest:
            raise PladaError(f"pool {u.file} on this worker is {pool.fingerprint[:16]}…, not the driver's "
                             f"{u.manifest[:16]}…: every worker must see the same pool")
        images = _OPENED[(u.file, u.manifest)] = pool.images  # type: ignore[assignment]
    return images.at(res)


def load_unit(u: Unit, res: int) -> np.ndarray:
    """The unit's images, read by the worker itself (a shard checked against its manifest slice)."""
    if u.kind == "files":
        return files_view(u, res)[u.start : u.stop]
    if u.kind == "shard":
        paths, hashes = manifest_slice(u.manifest, u.offset, u.stop - u.start)
        return read_shard(u.file, u.start, paths, hashes, res, u.count)[0]
    if u.kind == "npy":
        return np.array(np.load(u.file, mmap_mode="r")[u.start : u.stop])
    import ray

    return np.asarray(ray.get(u.ref))


def device_predict(model: Classifier, images: np.ndarray, batch_size: int, device: torch.device) -> np.ndarray:
    """`train.predict` on an actor's device, so a GPU actor computes as the local engine on a GPU does
    (mixed precision, prefetched pinned batches) and a CPU actor exactly as the local engine on the CPU."""
    return predict(model, images, batch_size=batch_size, progress=False, device=device)


class UnitScorer:
    """A Ray Data actor: builds the teacher once, then scores one unit per call and returns its logits.

    The logits travel back through the object store and the driver writes them, so workers need to
    read the pool (a shared or replicated filesystem) but never to write anywhere.
    """

    def __init__(self, spec: dict, state: object, units: list[Unit], res: int, batch_size: int, threads: int) -> None:
        import ray

        if isinstance(state, list):  # a nested ObjectRef: fetched here, not held as a constructor argument
            state = ray.get(state[0])
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        model = create(spec["name"], spec["classes"], spec["res"], pretrained=False)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
        self.model = model.eval().to(self.device)
        self.units, self.res, self.batch_size = units, res, batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits, seconds, read_s = [], [], []
        for i in batch["unit"]:
            u = self.units[int(i)]
            t0 = time.perf_counter()
            if u.kind == "files":  # decoded batch by batch while the previous one computes, as the local engine
                view = files_view(u, self.res)
                t1 = time.perf_counter()
                with closing(view.stream(u.start, u.stop, self.batch_size)) as images:
                    out = device_predict(self.model, images, self.batch_size, self.device)
                view.warn_bad()  # this worker's unreadable files, named once
            else:
                images = load_unit(u, self.res)
                t1 = time.perf_counter()
                out = device_predict(self.model, images, self.batch_size, self.device)
                del images
            logits.append(out.astype(np.float32).tobytes())
            seconds.append(time.perf_counter() - t0)
            read_s.append(t1 - t0)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"unit": np.asarray(batch["unit"]), "logits": np.array(logits, dtype=object),
                "seconds": np.array(seconds), "read_seconds": np.array(read_s),
                "peak_rss": np.full(len(logits), rss, dtype=np.int64), "pid": np.full(len(logits), os.getpid())}


@dataclass
class RayStats:
    """What a Ray run measured, for benchmarks: per-actor peak RSS and where the time went.

    Pass one as `score_pool_ray(..., stats=)`: each run overwrites all its fields as it ends, even by an error."""

    units: int = 0
    scored_units: int = 0
    actors: int = 0
    gpus_per_actor: float = 0.0
    seconds: float = 0.0
    actor_seconds: float = 0.0
    read_seconds: float = 0.0
    actor_peak_rss: dict[int, int] | None = None


def score_pool_ray(
    model: Classifier, pool: Pool, cache: Path, actors: int | None = None, batch_size: int = 256,
    progress: bool = True, chunk: int | None = None, cpus_per_actor: float | None = None,
    stats: RayStats | None = None,
) -> Scores:
    """Teacher logits for the pool computed by a Ray Data actor pool, merged in manifest order.

    Uses the running Ray runtime if there is one (`ray.init` before, or `RAY_ADDRESS` for a
    cluster), else starts a local one and shuts it down after. `actors` defaults to one per GPU, or
    one on a CPU-only cluster (threads = its CPUs). Units already in the cache are not recomputed.
    `stats`, when given, is filled in place with what the run measured (`RayStats`).
    """
    chunk = chunk or pool_chunk(pool)
    if isinstance(pool, ShardedPool) and chunk != pool.shard_size:
        raise PladaError(f"a sharded pool is scored by shard: chunk must be {pool.shard_size}, got {chunk}")
    if actors is not None and actors < 1:
        raise PladaError(f"actors must be a positive integer, got {actors}")
    ray = _ray()
    d = score_dir(cache, pool, model, chunk)
    d.mkdir(parents=True, exist_ok=True)
    n, classes = len(pool), model.head.out_features
    t0 = time.perf_counter()
    run = RayStats(actor_peak_rss={})
    started = False
    try:
        bounds = chunk_bounds(n, chunk)
        run.units = len(bounds)
        done = load_merged(d, bounds, classes)
        if done is not None:  # merged from exactly the chunks now there: nothing to score or merge
            return Scores(done)
        todo = [i for i, (a, b) in enumerate(bounds) if load_chunk(chunk_path(d, a), b - a, classes) is None]
        run.scored_units = len(todo)
        if todo:
            if not ray.is_initialized():
                ray.init(include_dashboard=False, log_to_driver=progress,
                         logging_level=logging.INFO if progress else logging.ERROR)
                started = True
            units = units_of(pool, chunk, put=ray.put)
            if [(u.start, u.stop) for u in units] != bounds:
                raise PladaError("internal: work units do not match the score chunks")
            _run_actors(ray, model, pool, units, todo, d, classes, actors, batch_size, progress, cpus_per_actor,
                        run)

        def chunk_logits(a: int, b: int) -> np.ndarray:
            logits = load_chunk(chunk_path(d, a), b - a, classes)
            if logits is None:
                raise PladaError(f"scores for pool rows {a}..{b} are missing after the Ray run (see {d})")
            return logits

        return merge_chunks(d, bounds, classes, chunk_logits)  # the local engine's merge, byte for byte
    finally:
        if started:
            ray.shutdown()
        run.seconds = time.perf_counter() - t0
        if stats is not None:
            vars(stats).update(vars(run))


def _run_actors(ray, model: Classifier, pool: Pool, units: list[Unit], todo: list[int], d: Path, classes: int,
                actors: int | None, batch_size: int, progress: bool, cpus_per_actor: float | None,
                stats: RayStats) -> None:
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts images, theirs counts blocks
    logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.ERROR)
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    n_actors = actors or max(1, gpus)
    n_actors = min(n_actors, len(todo))
    cpus = cpus_per_actor or max(1.0, float(int(res.get("CPU", 1)) // n_actors))
    state = ray.put({k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    spec = {"name": model.name, "classes": classes, "res": model.res}
    # A files pool is decoded at the teacher's own size, as `score.score_pool` reads it; a decoded pool's rows go
    # as they are and `train.prepare` resizes them on the actor, as it does locally.
    res_px = model.res if isinstance(pool.images, LazyImages) else int(pool.images.shape[1])
    ds = ray.data.from_items([{"unit": i} for i in todo], override_num_blocks=len(todo))
    ds = ds.map_batches(
        UnitScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=n_actors),
        num_gpus=1 if gpus else 0, num_cpus=cpus,
        fn_constructor_kwargs={"spec": spec, "state": [state], "units": units, "res": res_px,
                               "batch_size": batch_size, "threads": int(cpus)},
    )
    stats.actors, stats.gpus_per_actor = n_actors, 1.0 if gpus else 0.0
    total = sum(units[i].stop - units[i].start for i in todo)
    with tqdm(total=total, desc=f"scoring pool (ray, {n_actors} actor(s))", unit="img", disable=not progress) as bar:
        for row in ds.iter_rows():  # streamed: each unit's logits are written as soon as they arrive
            u = units[int(row["unit"])]
            logits = np.frombuffer(row["logits"], dtype=np.float32).reshape(u.stop - u.start, classes)
            atomic_save_npy(chunk_path(d, u.start), logits)
            stats.actor_seconds += float(row["seconds"])
            stats.read_seconds += float(row["read_seconds"])
            stats.actor_peak_rss[int(row["pid"])] = int(row["peak_rss"])
            bar.update(u.stop - u.start)
