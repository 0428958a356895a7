"""Hardening (issue 20): a pool rebuild never harms the pool it replaces; readers bound what a header can cost."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard as zstd
from conftest import _image, write_archive
from tqdm import tqdm

from plada import payload as P
from plada import pool as pool_mod
from plada.errors import PayloadError, PladaError
from plada.manifest import unstorable_paths
from plada.pool import build_pool, open_pool

FP = hashlib.sha256(b"test pool manifest").hexdigest()
POOL_FILES = [".lock", "current", "images.npy", "manifest.tsv", "missing.npy", "pool.json"]
MUTATING = ("replace", "rename", "symlink", "unlink", "remove", "rmdir", "mkdir")


@pytest.fixture()
def sources(tmp_path: Path, cache: Path) -> Path:
    """A data folder with two small sources of different images, so each build has its own fingerprint."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    for name, base in (("srca", (200, 20, 20)), ("srcb", (20, 20, 200))):
        write_archive(data / f"{name}.tar", name, {f"train/{c}/{i}.png": _image(rng, base, 8)
                                                   for c in ("x", "y") for i in range(6)})
    return data


def _build(data: Path, src: str) -> str:
    return build_pool([src], data, name="p", progress=False).fingerprint


def _fork(child: Callable[[], None]) -> int:
    """Run `child` in a forked process (its own monkeypatching dies with it); its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            # tqdm's write lock is a process-shared semaphore: a child SIGKILLed while holding it would leave
            # the parent's next progress bar (even a disabled one) waiting forever. The child gets its own.
            tqdm.set_lock(threading.RLock())
            child()
            code = 0
        finally:
            os._exit(code)
    return pid


def _kill_at(k: int, report: int | None = None) -> Callable[[Callable[[], object]], None]:
    """Patch every call that changes a directory entry so that the k-th SIGKILLs the process before it runs."""

    def run(fn: Callable[[], object]) -> None:
        calls = [0]
        for name in MUTATING:
            real = getattr(os, name)

            def hooked(*a, _real=real, **kw):
                calls[0] += 1
                if calls[0] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                return _real(*a, **kw)

            setattr(os, name, hooked)
        fn()
        if report is not None:
            os.write(report, str(calls[0]).encode())

    return run


def _layout_ok(root: Path) -> None:
    """One complete version, the fixed links, the lock: no temp file, no half-built or replaced version."""
    names = sorted(os.listdir(root))
    versions = [n for n in names if n.startswith("v-")]
    assert len(versions) == 1 and sorted(set(names) - set(versions)) == POOL_FILES, names
    assert sorted(os.listdir(root / versions[0])) == ["images.npy", "manifest.tsv", "missing.npy", "pool.json"]
    assert not [p for p in root.parent.iterdir() if p.name != root.name]  # nothing beside it either


@pytest.mark.parametrize("bad, shown", [("x\ny.png", "x\\ny.png"), ("x\ty.png", "x\\ty.png"),
                                        ("x\ry.png", "x\\ry.png"), ("\udcff.png", "ff.png")],
                         ids=["newline", "tab", "carriage-return", "not-utf8"])
def test_unstorable_file_name_keeps_the_old_pool(sources: Path, cache: Path, bad: str, shown: str) -> None:
    old = _build(sources, "srca")
    rng = np.random.default_rng(0)
    write_archive(sources / "srcc.tar", "srcc", {"train/x/ok.png": _image(rng, (0, 0, 0), 8),
                                                 f"train/x/{bad}": _image(rng, (9, 9, 9), 8)})
    with pytest.raises(PladaError) as e:
        build_pool(["srcc"], sources, name="p", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg and shown in msg  # names the file, on one line
    assert open_pool(cache / "pools" / "p", build=False).fingerprint == old


def test_unstorable_names_listed_by_the_manifest() -> None:
    paths = ["a/ok.png", "a/x\ny.png", "a/t\tab.png", "a/\udcff.png", "a/c\r.png", "a/n\x00.png"]
    assert unstorable_paths(paths) == paths[1:]
    with pytest.raises(PladaError, match=r"5 image file name\(s\)"):
        pool_mod._storable_manifest(sorted(paths), ["0123456789abcdef"] * len(paths))


def _kill_trials(root: Path, start: Callable[[], str], target: Callable[[int], str], data: Path,
                 fps: dict[str, str]) -> int:
    """Kill a rebuild at each of its directory changes in turn; every time, the pool opens as old or new."""
    r, w = os.pipe()
    old = start()
    pid = _fork(lambda: _kill_at(0, w)(lambda: _build(data, target(0))))
    assert os.waitpid(pid, 0)[1] == 0
    os.close(w)
    steps = int(os.read(r, 64))
    os.close(r)
    assert steps >= 8
    for k in range(1, steps + 1):
        old = start()
        src = target(k)
        new = fps[src]
        pid = _fork(lambda k=k, src=src: _kill_at(k)(lambda: _build(data, src)))
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (k, status)
        got = open_pool(root, build=False).fingerprint  # raises if the kill left no openable pool
        assert got in (old, new), (k, got)
    return steps


def test_sigkill_at_every_step_of_a_rebuild_leaves_an_openable_pool(sources: Path, cache: Path) -> None:
    root = cache / "pools" / "p"
    fps = {src: _build(sources, src) for src in ("srcb", "srca")}
    legacy = cache / "legacy"  # a pool folder as plada wrote it before versions: the files themselves
    shutil.copytree(root, legacy, symlinks=False)
    for n in os.listdir(legacy):
        if n not in POOL_FILES[2:]:
            shutil.rmtree(legacy / n) if (legacy / n).is_dir() else (legacy / n).unlink()

    def from_legacy() -> str:
        shutil.rmtree(root)
        shutil.copytree(legacy, root)
        return open_pool(root, build=False).fingerprint  # the old layout opens as it did

    def as_is() -> str:
        return open_pool(root, build=False).fingerprint

    # From the old layout to the new (srca -> srcb), then rebuild after rebuild on whatever each kill left.
    assert _kill_trials(root, from_legacy, lambda k: "srcb", sources, fps) >= 8
    assert _kill_trials(root, as_is, lambda k: ("srca", "srcb")[k % 2], sources, fps) >= 8

    rng = np.random.default_rng(5)  # and at moments that are not directory changes
    for i in range(8):
        pid = _fork(lambda i=i: _build(sources, ("srca", "srcb")[i % 2]))
        time.sleep(float(rng.uniform(0, 0.03)))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert open_pool(root, build=False).fingerprint in fps.values()

    assert _build(sources, "srca") == fps["srca"]  # a later build is never refused, and cleans up
    _layout_ok(root)
    assert np.array_equal(np.load(root / "images.npy"), open_pool(root, build=False).images)


def test_concurrent_builds_of_one_pool_take_turns(sources: Path, cache: Path, tmp_path: Path) -> None:
    refs = {s: build_pool([s], sources, name=f"ref-{s}", progress=False) for s in ("srca", "srcb")}
    for s in refs:
        shutil.rmtree(cache / "pools" / f"ref-{s}")  # keep their arrays (memory-mapped), not their folders

    def child(src: str) -> Callable[[], None]:
        def run() -> None:
            real = pool_mod.atomic_write

            def slow(*a, **kw):  # widen the build so the two always overlap
                time.sleep(0.5)
                return real(*a, **kw)

            pool_mod.atomic_write = slow
            out = tmp_path / f"{src}.result"
            try:
                out.write_text("ok " + _build(sources, src))
            except PladaError as e:
                out.write_text("err " + str(e))
            except BaseException as e:
                out.write_text("crash " + " ".join(repr(e).split()))
                raise
        return run

    pids = [_fork(child("srca")), _fork(child("srcb"))]
    for pid in pids:
        os.waitpid(pid, 0)
    results = {s: (tmp_path / f"{s}.result").read_text() for s in refs}
    ok = {s: r.split(" ", 1)[1] for s, r in results.items() if r.startswith("ok ")}
    assert ok and all(r.startswith("ok ") or (r.startswith("err ") and "\n" not in r) for r in results.values()), \
        results
    got = open_pool(cache / "pools" / "p", build=False)
    (src,) = [s for s in ok if ok[s] == got.fingerprint]
    assert np.array_equal(np.asarray(got.images), np.asarray(refs[src].images))  # one build's pixels, whole
    _layout_ok(cache / "pools" / "p")


def test_rebuild_over_a_half_deleted_pool(sources: Path, cache: Path) -> None:
    """What an older plada killed while deleting a pool left: its files minus pool.json; now replaced."""
    root = cache / "pools" / "p"
    root.mkdir(parents=True)
    np.save(root / "images.npy", np.zeros((2, 8, 8, 3), np.uint8))
    np.save(root / "missing.npy", np.zeros(2, bool))
    assert _build(sources, "srca") == open_pool(root, build=False).fingerprint
    _layout_ok(root)
    (cache / "mine").mkdir()
    (cache / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(PladaError, match="is not a pool folder"):  # anything not ours is still left alone
        build_pool(["srca"], sources, out=cache / "mine", progress=False)
    assert os.listdir(cache / "mine") == ["notes.txt"]


# ---------------------------------------------------------------------------------------------- payloads


def _gap_bomb(count: int, pool_size: int = 1 << 30) -> bytes:
    """A valid few-hundred-byte payload that keeps `count` images: all-zero gaps and labels compress to nothing."""
    index = zstd.ZstdCompressor(level=19).compress(bytes(count))
    labels = zstd.ZstdCompressor(level=19).compress(bytes(count))
    return _pack({"pool_fingerprint": FP, "pool_size": pool_size, "class_names": ["a"], "count": count,
                  "groups": None, "forecast": None, "receiver": "plain",
                  "sections": [{"name": "index", "codec": "gap-zstd", "length": len(index)},
                               {"name": "labels", "codec": "u8-zstd", "length": len(labels)}]}, [index, labels])


def _pack(header: dict, blobs: list[bytes]) -> bytes:
    """A format 1.0 file: the canonical JSON header as one zstd frame made with the header dictionary."""
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    zdict = zstd.ZstdCompressionDict(P.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    stored = zstd.ZstdCompressor(level=19, dict_data=zdict, write_content_size=True, write_dict_id=False).compress(text)
    body = struct.pack("<8sHI", P.MAGIC, P.FORMAT_VERSION, len(stored)) + stored + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


_decompress = P._decompress


def _never(blob: bytes, lo: int, hi: int, what: str, *rest: object) -> bytes:
    """Stands in for `payload._decompress`: the header frame inflates (it is bounded to 1 MiB), no section does."""
    if what != "header":
        raise AssertionError(f"the {what} section was inflated")
    return _decompress(blob, lo, hi, what, *rest)


def _never_codec(*_: object) -> object:
    raise AssertionError("the joint section was decoded")


def test_header_claims_are_bounded_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    count = 2_000_001  # one past the default limit
    bomb = _gap_bomb(count)
    assert len(bomb) < 1000
    nbytes = 384 * 50_000 + P.BITMAP_SLACK  # the largest bitmap the format allows for 50,000 images
    blob = zstd.ZstdCompressor(level=1).compress(bytes(nbytes))
    labels = zstd.ZstdCompressor(level=1).compress(bytes(50_000))
    bitmap = _pack({"pool_fingerprint": FP, "pool_size": 8 * nbytes, "class_names": ["a"], "count": 50_000,
                    "groups": None, "forecast": None, "receiver": "plain",
                    "sections": [{"name": "index", "codec": "bitmap-zstd", "length": len(blob)},
                                 {"name": "labels", "codec": "u8-zstd", "length": len(labels)}]},
                   [blob, labels])
    assert P.peek_header(bomb)["count"] == count and P.peek_header(bitmap)["count"] == 50_000  # well-formed 1.0
    (tmp_path / "bomb.plada").write_bytes(bomb)
    with monkeypatch.context() as mp:
        mp.setattr(P, "_decompress", _never)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            for call, data in ((P.describe, bomb), (P.decode, bomb), (P.describe, bitmap)):
                with pytest.raises(PayloadError) as e:
                    call(data)
                msg = str(e.value)
                assert "--trust" in msg and "--max-images" in msg and "\n" not in msg, msg
            with pytest.raises(PayloadError, match=f"--max-images {count}.*bomb.plada"):
                P.read(tmp_path / "bomb.plada")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert time.perf_counter() - t0 < 2 and peak < 5_000_000, peak
        info = P.describe(bomb, header_only=True)  # sizes from the frame headers, nothing inflated
        assert not info["decoded"] and info["count"] == count and info["total_bytes"] == len(bomb)
        assert [(s["name"], s["raw_bytes"]) for s in info["sections"]] == [("index", count), ("labels", count)]
        assert 14 + info["header_bytes"] + sum(s["stored_bytes"] for s in info["sections"]) + 32 == len(bomb)
    info = P.describe(bomb, max_images=count)  # a raised limit decodes it
    assert info["decoded"] and info["count"] == count
    p = P.decode(bomb, max_images=None)
    assert p.count == count and int(p.indices[-1]) == count - 1
    with pytest.raises(PladaError, match="max_images"):
        P.decode(bomb, max_images=-1)


def test_describe_without_the_pools_groups_reports_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    gid = np.repeat(np.arange(400), 300)
    energy = rng.normal(0, 2, 400)[gid] + rng.normal(0, 1, gid.size)
    idx = np.sort(np.argpartition(energy, 1199)[:1200])
    p = P.Payload(FP, gid.size, tuple(f"c{i}" for i in range(10)), idx, rng.integers(0, 10, 400)[gid[idx]])
    data = P.encode(p, groups=gid)
    with monkeypatch.context() as mp:
        mp.setattr(P.codec, "decode", _never_codec)
        info = P.describe(data)  # no error: the header and sizes, and what is needed to decode
    full = P.describe(data, groups=gid)
    assert full["decoded"] and full["groups"]["count"] == 400
    assert not info["decoded"] and "--pool" in info["note"] and info["groups"] == full["groups"]
    assert [(s["name"], s["codec"], s["stored_bytes"]) for s in info["sections"]] == \
        [(s["name"], s["codec"], s["stored_bytes"]) for s in full["sections"]]
    keys = ("format", "header_bytes", "count", "pool_size", "class_names", "forecast", "receiver")
    assert {k: info[k] for k in keys} == {k: full[k] for k in keys} and info["format"] == "1.0"
    with pytest.raises(PayloadError, match="coded per folder of its pool"):
        P.decode(data)  # decoding still needs them
