"""Hardening: partial and mismatched pools, unreadable images, crashes mid-job, one-line CLI errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import _image, one_line, run, write_archive

from plada import payload
from plada.cli import main
from plada.data import atomic_write
from plada.errors import PladaError
from plada.pool import Pool

FAST = ["--set", "teacher.res=32", "--set", "teacher.epochs=1", "--keep", "10%"]
STUDENT = ["--set", "student.res=32", "--set", "student.epochs=1"]


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture(scope="module")
def sent(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """One sender run shared by the module: pool `tinypool`, its payload and exported manifest."""
    root = tmp_path_factory.mktemp("sent")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLADA_CACHE", str(root / "cache"))
        out = root / "t.plada"
        assert main(["--json", "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                     "-o", str(out), *FAST]) == 0
        manifest = root / "manifest.tsv"
        assert main(["--json", "pool", "export", "tinypool", "-o", str(manifest)]) == 0
        yield SimpleNamespace(root=root, cache=root / "cache", payload=out, manifest=manifest, data=tiny_data)


def test_atomic_write_leaves_nothing_half_written(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def dies_midway(f) -> None:
        f.write(b"half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(target, dies_midway)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_export_and_rebuild_from_manifest(sent, capsys: pytest.CaptureFixture) -> None:
    code, built, err = run(capsys, "pool", "build", "tinypool", "--name", "copy", "--data", str(sent.data),
                           "--manifest", str(sent.manifest))
    assert code == 0, err
    fp = hashlib.sha256(sent.manifest.read_bytes()).hexdigest()
    assert built["fingerprint"] == fp == payload.read(sent.payload).pool_fingerprint
    assert built["missing"] == 0 and built["skipped"] == 0 and built["size"] == 320
    pools = sent.cache / "pools"
    assert np.array_equal(np.load(pools / "copy" / "images.npy"), np.load(pools / "tinypool" / "images.npy"))


def test_partial_pool(sent, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A receiver lacking, or holding altered or corrupt copies of, some kept images."""
    kept = payload.read(sent.payload).indices.tolist()
    paths = [ln.split("\t")[0] for ln in sent.manifest.read_text().splitlines()]
    files = tar_members(sent.data / "tinypool.tar")
    kept_paths = [paths[i] for i in kept]
    other = next(p for p in paths if p not in kept_paths)
    del files[kept_paths[0]], files[kept_paths[1]], files[other]  # lost files
    files[kept_paths[2]] = _image(np.random.default_rng(9), (0, 0, 0))  # a different image, same name
    files[kept_paths[3]] = b"\x89PNG\r\n\x1a\n garbage"  # bit rot: unreadable
    data = tmp_path / "data"
    data.mkdir()
    write_tar(data / "tinypool.tar", files)

    code, built, err = run(capsys, "pool", "build", "tinypool", "--name", "recv", "--data", str(data),
                           "--manifest", str(sent.manifest))
    assert code == 0, err
    assert built["missing"] == 5 and built["skipped"] == 1 and built["size"] == 320
    assert "warning: skipped 1 unreadable" in err and one_line(err)
    missing = np.load(sent.cache / "pools" / "recv" / "missing.npy")
    assert missing.sum() == 5 and not missing[[paths.index(p) for p in kept_paths[4:]]].any()

    model = tmp_path / "s.safetensors"
    code, _, err = run(capsys, "receive", str(sent.payload), "--pool", "recv", "--model-out", str(model), *STUDENT)
    assert code == 2 and one_line(err)
    assert f"4 of the payload's {len(kept)} kept images" in err and "--allow-missing" in err
    assert not model.exists()

    code, got, err = run(capsys, "receive", str(sent.payload), "--pool", "recv", "--allow-missing",
                         "--model-out", str(model), *STUDENT)
    assert code == 0, err
    assert got["dropped_missing"] == 4 and got["kept"] == len(kept) - 4 and model.is_file()

    code, _, err = run(capsys, "send", "tinytarget", "--pool", "recv", "--data", str(sent.data),
                       "-o", str(tmp_path / "x.plada"), *FAST)
    assert code == 2 and "needs the complete pool" in err and not (tmp_path / "x.plada").exists()


def test_mismatch_names_both_fingerprints(sent, capsys: pytest.CaptureFixture) -> None:
    code, other, err = run(capsys, "pool", "build", "tinytarget:train", "--name", "other", "--data", str(sent.data))
    assert code == 0, err
    code, _, err = run(capsys, "receive", str(sent.payload), "--pool", "other", "--allow-missing", *STUDENT)
    assert code == 2 and one_line(err)
    assert payload.read(sent.payload).pool_fingerprint[:16] in err and other["fingerprint"][:16] in err


def test_hostile_header_refused_before_inflating(sent, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A 600-byte bitmap bomb (the decoder would allocate ~130 MB) is refused by our pool before any inflating."""
    import struct

    import zstandard as zstd

    real = payload._decompress
    inflated = []

    def never(blob, lo, hi, what, *rest):  # the header frame may inflate (it is bounded), no section may
        inflated.append(what)
        if what != "header":
            raise AssertionError("a section was inflated before the pool check")
        return real(blob, lo, hi, what, *rest)

    fp = payload.read(sent.payload).pool_fingerprint
    monkeypatch.setattr(payload, "_decompress", never)
    count = 20_000
    nbytes = 384 * count + payload.BITMAP_SLACK  # the largest bitmap the format allows for this count
    blob = zstd.ZstdCompressor(level=19).compress(b"\xff" * nbytes)
    labels = zstd.ZstdCompressor(level=19).compress(bytes(count))
    zdict = zstd.ZstdCompressionDict(payload.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    for claimed_fp, message in ((fp, "payload is for a pool of"), ("cd" * 32, "payload was made for pool cdcdcdcd")):
        text = json.dumps({"pool_fingerprint": claimed_fp, "pool_size": 8 * nbytes, "class_names": ["a"],
                           "count": count, "groups": None, "forecast": None, "receiver": "plain", "sections": [
                               {"name": "index", "codec": "bitmap-zstd", "length": len(blob)},
                               {"name": "labels", "codec": "u8-zstd", "length": len(labels)}]},
                          sort_keys=True, separators=(",", ":")).encode()
        header = zstd.ZstdCompressor(level=19, dict_data=zdict, write_content_size=True,
                                     write_dict_id=False).compress(text)
        body = struct.pack("<8sHI", payload.MAGIC, payload.FORMAT_VERSION, len(header)) + header + blob + labels
        bomb = tmp_path / "bomb.plada"
        bomb.write_bytes(body + hashlib.sha256(body).digest())
        assert len(bomb.read_bytes()) < 1000
        inflated.clear()
        code, _, err = run(capsys, "receive", str(bomb), "--pool", "tinypool", *STUDENT)
        assert code == 2 and message in err and one_line(err)
        assert "header" in inflated  # it got as far as the header: refused as another pool's, not as malformed


def test_bad_images_skipped(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(1)
    good = {f"train/a/{i}.png": _image(rng, (200, 0, 0)) for i in range(3)}
    bad = {"train/a/garbage.png": os.urandom(300), "train/b/empty.png": b"",
           "train/b/cut.png": _image(rng, (0, 200, 0))[:60]}
    write_archive(tmp_path / "rotten.tar", "rotten", {**good, **bad})
    code, built, err = run(capsys, "pool", "build", str(tmp_path / "rotten.tar"))
    assert code == 0, err
    assert built["size"] == 3 and built["skipped"] == 3 and built["missing"] == 0
    assert "warning: skipped 3 unreadable image(s) in rotten.tar" in err and one_line(err)

    write_archive(tmp_path / "dead.tar", "dead", bad)
    code, _, err = run(capsys, "pool", "build", str(tmp_path / "dead.tar"))
    assert code == 2 and "no image in" in err and one_line(err)
    assert sorted(p.name for p in (cache / "pools").iterdir()) == ["rotten"]


def _manifest(tmp_path: Path, text: bytes | None = None, name: str = "m.tsv") -> str:
    if text is not None:
        (tmp_path / name).write_bytes(text)
    return str(tmp_path / name)


H = "0123456789abcdef"


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda t: ["pool", "build", "tinypool", "--manifest", _manifest(t)], "manifest not found"),
        (lambda t: ["pool", "build", "tinypool", "--manifest", str(t)], "is a directory"),
        (lambda t: ["pool", "build", "tinypool", "--manifest", _manifest(t, os.urandom(64) + b"\xff")],
         "not a pool manifest"),
        (lambda t: ["pool", "build", "tinypool", "--manifest", _manifest(t, f"a\t{H}\nb {H}\n".encode())],
         "line 2"),
        (lambda t: ["pool", "build", "tinypool", "--manifest", _manifest(t, f"b\t{H}\na\t{H}\n".encode())],
         "not in pool order"),
        (lambda t: ["pool", "build", "tinypool", "--manifest", _manifest(t, f"a\t{H}\na\t{H}\n".encode())],
         "same image path twice"),
        (lambda t: ["pool", "build", "tinypool", "--manifest", _manifest(t, f"x/train/a/1.png\t{H}\n".encode())],
         "none of the manifest's 1 images"),
        (lambda t: ["pool", "build", "tinypool", "--out", str(t)], "is not a pool folder"),
        (lambda t: ["pool", "export", "nosuch", "-o", str(t / "m.tsv")], "no pool 'nosuch'"),
        (lambda t: ["pool", "export", "nosuch"], "required: --out/-o"),
        (lambda t: ["receive", str(t / "none.plada"), "--pool", "tinypool", "--allow-missing"], "payload not found"),
        (lambda t: ["receive", "--allow-missing=yes", "x.plada"], "ignore"),
    ],
    ids=["manifest-absent", "manifest-is-dir", "manifest-binary", "manifest-bad-line", "manifest-unsorted",
         "manifest-duplicate", "manifest-foreign", "out-not-a-pool", "export-unknown-pool", "export-no-out",
         "receive-no-payload", "flag-with-value"],
)
def test_cli_mistakes(argv, message: str, tiny_data: Path, cache: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLADA_DATA", str(tiny_data))
    work = tmp_path / "work"  # the cache lives beside it: decoding a source there is not a partial write
    work.mkdir()
    (work / "keep.txt").write_text("user data")
    args = argv(work)
    before = sorted(p.name for p in work.iterdir())
    try:
        code = main(["--json", *args])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("plada: error: ") and one_line(err)
    assert message in err and not out
    assert sorted(p.name for p in work.iterdir()) == before
    pools = cache / "pools"
    assert not pools.exists() or not [p for p in pools.iterdir() if p.name.endswith(".building")]


def test_export_to_missing_folder(sent, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "pool", "export", "tinypool", "-o", str(tmp_path / "no" / "m.tsv"))
    assert code == 2 and "output folder does not exist" in err and one_line(err)


def test_bad_chunk_env(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLADA_SCORE_CHUNK", "lots")
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                       "-o", str(tmp_path / "x.plada"), *FAST)
    assert code == 2 and "PLADA_SCORE_CHUNK" in err and one_line(err)
    assert not (cache / "teachers").exists()  # refused before any work


def test_damaged_score_chunk_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from plada.backbones import create
    from plada.score import score_pool

    torch.manual_seed(0)
    model = create("small-cnn", 3, 32, pretrained=False)
    images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    pool = Pool("p", tmp_path, images, [f"x/{i}" for i in range(10)], ["0" * 16] * 10, "ab" * 32)
    first = score_pool(model, pool, tmp_path / "scores", progress=False, chunk=4).logits
    chunks = sorted((tmp_path / "scores").glob("*/[0-9]*.npy"))
    assert len(chunks) == 3 and chunks[0].parent.name.endswith("-c4")
    chunks[1].write_bytes(chunks[1].read_bytes()[:50])  # half a file, as an old non-atomic writer might leave
    again = score_pool(model, pool, tmp_path / "scores", progress=False, chunk=4).logits
    assert np.array_equal(first, again)
    monkeypatch.setenv("PLADA_SCORE_CHUNK", "0")
    with pytest.raises(PladaError, match="PLADA_SCORE_CHUNK"):
        score_pool(model, pool, tmp_path / "scores", progress=False)


# Scoring slowed down so the kill lands between chunks; everything else is the real CLI in a real process.
SLOW_SEND = (
    "import sys, time\n"
    "import plada.score as s\n"
    "fast = s.predict\n"
    "def slow(*a, **k):\n"
    "    time.sleep(0.3)\n"
    "    return fast(*a, **k)\n"
    "s.predict = slow\n"
    "from plada.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_sigkill_during_scoring_resumes_identically(tiny_data: Path, tmp_path: Path) -> None:
    def env(cache: str) -> dict:
        return {**os.environ, "PLADA_CACHE": str(tmp_path / cache), "PLADA_SCORE_CHUNK": "32",
                "OMP_NUM_THREADS": "1"}

    def send(cache: str, out: str, script: str | None = None) -> subprocess.Popen:
        head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "plada.cli"]
        return subprocess.Popen([*head, "--json", "send", "tinytarget", "--pool", "tinypool", "--data",
                                 str(tiny_data), "-o", str(tmp_path / out), *FAST],
                                env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    proc = send("a", "a.plada", SLOW_SEND)
    chunks = lambda: sorted((tmp_path / "a" / "scores").glob("*/[0-9]*.npy"))  # noqa: E731
    deadline = time.monotonic() + 600
    while not chunks():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "scoring never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = {p: p.stat().st_mtime_ns for p in chunks()}
    assert 1 <= len(done) < 10  # 320 pool images in chunks of 32: killed part-way
    assert not (tmp_path / "a.plada").exists()

    for cache, out in (("a", "a.plada"), ("b", "b.plada")):  # resume, then an uninterrupted run
        proc = send(cache, out)
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished chunks were reused, not recomputed
    assert len(chunks()) == 10
    assert (tmp_path / "a.plada").read_bytes() == (tmp_path / "b.plada").read_bytes()
