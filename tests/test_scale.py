"""Sharded pools and the Ray engine, on tiny data with a real local Ray runtime (no mocks)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import one_line, run

from plada import engines, payload
from plada.backbones import create
from plada.cli import main
from plada.errors import PladaError
from plada.pool import Pool, build_pool, fingerprint_of
from plada.score import score_pool
from plada.shards import ShardedPool, open_sharded, write_shards

ray = pytest.importorskip("ray")
FAST = ["--teacher", "small-cnn", "--set", "teacher.res=32", "--set", "teacher.epochs=1", "--keep", "10%"]


def members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def write_tar(path: Path, files: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> None:
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, raw in files:
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


@pytest.fixture(scope="module")
def pools(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """`tinypool` (320 images) built in a module cache, and the same pool as 4 npy shards (96, 96, 96, 32)."""
    root = tmp_path_factory.mktemp("scale")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLADA_CACHE", str(root / "cache"))
        plain = build_pool(["tinypool"], tiny_data, name="tinypool", progress=False)
        assert main(["--json", "pool", "shard", "tinypool", "--out", str(root / "shards"), "--shard-size", "96"]) == 0
        yield SimpleNamespace(root=root, cache=root / "cache", data=tiny_data, plain=plain,
                              shards=root / "shards")


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime for the module's Ray tests (2 CPUs), shut down after them."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_shards_read_in_any_order_give_the_pool(pools, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    names = sorted(p.name for p in pools.shards.iterdir())
    assert names == ["manifest.tsv", "missing.npy", "pool-000000.tar", "pool-000001.tar", "pool-000002.tar",
                     "pool-000003.tar", "pool.json"]
    assert (pools.shards / "manifest.tsv").read_bytes() == (pools.plain.root / "manifest.tsv").read_bytes()
    first = [n for n, _ in members(pools.shards / "pool-000000.tar")]
    assert first[:2] == ["0000000000.npy", "0000000000.json"] and len(first) == 2 * 96
    record = json.loads(members(pools.shards / "pool-000000.tar")[1][1])
    assert record["path"] == pools.plain.paths[0] and record["hash"] == pools.plain.hashes[0]

    sp = open_sharded(pools.shards)
    assert isinstance(sp, ShardedPool) and sp.fingerprint == pools.plain.fingerprint and len(sp) == 320
    want = np.asarray(pools.plain.images)
    rng = np.random.default_rng(0)
    for order in (None, [3, 2, 1, 0], rng.permutation(4).tolist()):
        got = np.full_like(want, 7)
        for start, images, held in sp.iter_shards(order):
            assert held.all()
            got[start : start + len(images)] = images
        assert np.array_equal(got, want)
    idx = rng.permutation(320)[:50]
    assert np.array_equal(sp.images[idx], want[idx]) and np.array_equal(sp.images[-1], want[-1])
    assert np.array_equal(sp.images[90:200], want[90:200])

    # PNG members, and the same pool written twice gives byte-identical shards
    code, rep, err = run(capsys, "pool", "shard", str(pools.plain.root), "--out", str(tmp_path / "png"),
                         "--shard-size", "100", "--format", "png")
    assert code == 0, err
    assert rep["shards"] == 4 and rep["format"] == "png" and rep["fingerprint"] == pools.plain.fingerprint
    assert np.array_equal(open_sharded(tmp_path / "png").images[:], want)
    again = write_shards(open_sharded(pools.shards), tmp_path / "again", shard_size=96, progress=False)
    assert all((again.root / s.file).read_bytes() == (pools.shards / s.file).read_bytes() for s in again.shards)

    # every --pool takes a sharded folder
    code, rep, err = run(capsys, "pool", "export", str(pools.shards), "-o", str(tmp_path / "m.tsv"))
    assert code == 0 and rep["fingerprint"] == pools.plain.fingerprint, err


def test_members_are_placed_by_the_manifest_not_the_tar(pools, tmp_path: Path) -> None:
    """A shard rewritten by another tool (PAX headers, members reversed) reads back the same."""
    sp = write_shards(open_sharded(pools.shards), tmp_path / "s", shard_size=96, progress=False)
    f = sp.root / sp.shards[1].file
    files = members(f)
    pairs = [files[i : i + 2] for i in range(0, len(files), 2)][::-1]
    write_tar(f, [m for pair in pairs for m in pair[::-1]])
    assert np.array_equal(open_sharded(sp.root).images[:], np.asarray(pools.plain.images))


@pytest.mark.parametrize("damage, message", [
    ("swap", "not in its manifest range"),
    ("pixels", "is damaged"),
    ("hash", "the manifest says"),
    ("drop", "holds 95 images, its pool says 96"),
    ("orphan", "lacks its json record"),
    ("truncate", "cannot read shard"),
    ("table", "is not manifest rows 96..192"),
])
def test_damaged_shards_are_refused(pools, tmp_path: Path, damage: str, message: str) -> None:
    sp = write_shards(open_sharded(pools.shards), tmp_path / "s", shard_size=96, progress=False)
    f0, f1 = (sp.root / s.file for s in sp.shards[:2])
    files = members(f0)
    if damage == "swap":
        a, b = f0.read_bytes(), f1.read_bytes()
        f0.write_bytes(b)
        f1.write_bytes(a)
    elif damage == "pixels":
        raw = bytearray(files[4][1])
        raw[-1] ^= 1
        files[4] = (files[4][0], bytes(raw))
        write_tar(f0, files, tarfile.USTAR_FORMAT)
    elif damage == "hash":
        rec = json.loads(files[5][1])
        rec["hash"] = "0" * 16
        files[5] = (files[5][0], json.dumps(rec).encode())
        write_tar(f0, files, tarfile.USTAR_FORMAT)
    elif damage == "drop":
        write_tar(f0, files[:4] + files[6:], tarfile.USTAR_FORMAT)
    elif damage == "orphan":
        write_tar(f0, files[:-1], tarfile.USTAR_FORMAT)
    elif damage == "truncate":
        f0.write_bytes(f0.read_bytes()[:5000])
    elif damage == "table":
        meta = json.loads((sp.root / "pool.json").read_text())
        meta["shards"][1]["start"] += 1
        (sp.root / "pool.json").write_text(json.dumps(meta))
    with pytest.raises(PladaError, match=message):
        open_sharded(sp.root).images[:]


def test_shard_cli_mistakes(pools, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    for argv, message in (
        (["--out", str(tmp_path / "mine")], "is not a sharded pool folder"),
        (["--out", str(tmp_path / "no" / "x")], "output folder does not exist"),
        (["--out", str(tmp_path / "x"), "--shard-size", "0"], "shard size must be a positive integer"),
    ):
        code, _, err = run(capsys, "pool", "shard", str(pools.plain.root), *argv)
        assert code == 2 and message in err and one_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


def test_partial_pool_keeps_its_missing_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    missing = np.zeros(40, bool)
    missing[[0, 7, 8, 39]] = True
    images[missing] = 0
    paths = [f"s/train/a/{i:03d}.png" for i in range(40)]
    hashes = [f"{i:016x}" for i in range(40)]
    pool = Pool("partial", tmp_path, images, paths, hashes, fingerprint_of(paths, hashes), missing)
    sp = write_shards(pool, tmp_path / "s", shard_size=16, progress=False)
    assert [s.count for s in sp.shards] == [13, 16, 7] and np.array_equal(sp.missing, missing)
    assert np.array_equal(sp.images[:], images)


def test_streaming_memory_does_not_grow_with_the_pool(tmp_path: Path) -> None:
    """Writing and reading shards hold one shard of pixels: traced peak at 4N is that at N plus the manifest."""
    def peaks(n: int) -> tuple[int, int]:
        d = tmp_path / str(n)
        d.mkdir()
        images = np.lib.format.open_memmap(d / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 32, 32, 3))
        for a in range(0, n, 512):
            images[a : a + 512] = np.random.default_rng(a).integers(0, 256, (min(512, n - a), 32, 32, 3), np.uint8)
        paths = [f"s/train/a/{i:06d}.png" for i in range(n)]
        hashes = [f"{i:016x}" for i in range(n)]
        pool = Pool("p", d, images, paths, hashes, fingerprint_of(paths, hashes))
        tracemalloc.start()
        write_shards(pool, d / "s", shard_size=128, progress=False)
        write_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        sp = open_sharded(d / "s")
        tracemalloc.start()
        for _ in sp.iter_shards():
            pass
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return write_peak, read_peak

    n, pixels = 512, 32 * 32 * 3
    (w1, r1), (w4, r4) = peaks(n), peaks(4 * n)
    shard = 128 * pixels
    assert r4 < r1 + shard / 4 and r4 < 4 * shard, (r1, r4)
    # the manifest (a few hundred bytes per image as Python strings) grows with the pool; pixels do not
    assert w4 - w1 < 3 * n * pixels / 4, (w1, w4)


@pytest.mark.slow
def test_ray_engine_matches_local(pools, ray_runtime, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create("small-cnn", 3, 32, pretrained=False).eval()
    sp = open_sharded(pools.shards)
    ref = score_pool(model, pools.plain, tmp_path / "local", progress=False)
    st = engines.RayStats()
    runs = {
        "local-shards": engines.score(model, sp, tmp_path / "local-shards", engine="local", progress=False),
        "ray-npy": engines.score_pool_ray(model, pools.plain, tmp_path / "ray-npy", actors=1, progress=False),
        "ray-shards": engines.score_pool_ray(model, sp, tmp_path / "ray-shards", actors=2, progress=False, stats=st),
    }
    assert st.actors == 2 and st.scored_units == 4
    for name, got in runs.items():
        assert np.array_equal(got.labels, ref.labels), name
        np.testing.assert_allclose(got.energy(), ref.energy(), atol=1e-4, rtol=0, err_msg=name)
        np.testing.assert_allclose(got.logits, ref.logits, atol=1e-4, rtol=0, err_msg=name)

    # engines share one cache layout: a sharded pool is chunked by shard, whichever engine scores it
    local_files = sorted(p.name for p in (tmp_path / "local-shards").glob("*/[0-9]*.npy"))
    assert local_files == sorted(p.name for p in (tmp_path / "ray-shards").glob("*/[0-9]*.npy"))
    assert len(local_files) == 4

    # resume: only lost or damaged units are recomputed, the merge is unchanged
    chunks = sorted((tmp_path / "ray-shards").glob("*/[0-9]*.npy"))
    chunks[1].unlink()
    chunks[2].write_bytes(chunks[2].read_bytes()[:40])
    kept = {p: p.stat().st_mtime_ns for p in (chunks[0], chunks[3])}
    again = engines.score_pool_ray(model, sp, tmp_path / "ray-shards", actors=1, progress=False, stats=st)
    assert st.scored_units == 2
    assert {p: p.stat().st_mtime_ns for p in kept} == kept
    assert np.array_equal(again.logits, runs["ray-shards"].logits)


@pytest.mark.slow
def test_send_with_ray_engine_gives_the_same_payload(pools, ray_runtime, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLADA_CACHE", str(pools.cache))
    a, b = tmp_path / "ray.plada", tmp_path / "local.plada"
    code, sent, err = run(capsys, "send", "tinytarget", "--pool", str(pools.shards), "--data", str(pools.data),
                          "--engine", "ray", "--set", "actors=2", "-o", str(a), *FAST)
    assert code == 0, err
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(pools.data), "-o", str(b),
                       *FAST)
    assert code == 0, err
    assert a.read_bytes() == b.read_bytes() and sent["kept"] == 32

    # `plada score` reuses the Ray run's chunks and writes the scores in manifest order
    st, ray_run = engines.RayStats(scored_units=-1), engines.score_pool_ray
    monkeypatch.setattr(engines, "score_pool_ray", lambda *args, **kw: ray_run(*args, **kw, stats=st))
    code, rep, err = run(capsys, "score", "tinytarget", "--pool", str(pools.shards), "--data", str(pools.data),
                         "--engine", "ray", "-o", str(tmp_path / "s.npz"), *FAST[:6])
    assert code == 0, err
    assert rep["pool_size"] == 320 and sum(rep["per_class"]) == 320 and st.scored_units == 0
    scores = np.load(tmp_path / "s.npz")
    p = payload.read(a)
    assert np.array_equal(scores["labels"][p.indices], p.labels) and str(scores["fingerprint"]) == p.pool_fingerprint

    # a receiver holding the sharded pool trains on the kept images gathered from the shards
    code, rec, err = run(capsys, "receive", str(a), "--pool", str(pools.shards), "--student", "small-cnn",
                         "--set", "student.res=32", "--set", "student.epochs=1")
    assert code == 0 and rec["kept"] == 32, err


def test_engine_mistakes(pools, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLADA_CACHE", str(tmp_path / "cache"))
    for argv, message in (
        (["send", "tinytarget", "--engine", "dask", "-o", str(tmp_path / "x.plada")], "invalid choice"),
        (["send", "tinytarget", "--set", "actors=0", "-o", str(tmp_path / "x.plada")], "actors must be an integer"),
        (["score", "--pool", str(pools.shards)], "needs either a target dataset"),
        (["score", "tinytarget", "--model", "m.safetensors"], "needs either a target dataset"),
    ):
        try:
            code = main(["--json", *argv, "--data", str(pools.data)])
        except SystemExit as e:
            code = e.code
        _, err = capsys.readouterr()
        assert code == 2 and message in err and one_line(err), err
    assert not (tmp_path / "cache" / "teachers").exists()


@pytest.mark.slow
def test_scale_benchmark_quick(ray_runtime, tmp_path: Path, cache: Path) -> None:
    from benchmarks import scale

    assert scale.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results" / "scale_quick.json").read_text())
    tp = res["throughput"]
    for key in ("bare_forward", "local", "ray_shards", "ray_npy"):
        assert tp[key]["images_per_s"] > 0
    phases = [(r["phase"], r["images"]) for r in res["memory"]["rows"]]
    assert ("write shards", 32) in phases and ("write shards", 128) in phases
    assert all(r.get("peak_anon_growth_mb") is not None for r in res["memory"]["rows"] if os.path.exists("/proc"))
    assert res["projection"]["label"].startswith("PROJECTION") and res["projection"]["wall_hours"] > 0
    md = (tmp_path / "benchmarks" / "reports" / "SCALE_quick.md").read_text()
    assert "PROJECTION" in md and "python -m benchmarks.scale --quick" in md
    assert ray.is_initialized()  # the benchmark used the running runtime and left it running
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
