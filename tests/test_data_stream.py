"""`load_source` streams: one pass in storage order, pixels never all in memory, cache bytes as before.

The oracle is the pre-streaming implementation, copied below (`_reference_load`, `_reference_source_hash`)
and kept in memory: the streamed cache must match it byte for byte, errors included.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import write_archive
from PIL import Image

from plada import data as D
from plada.errors import PladaError

# --- the oracle: the in-memory load_source and source_hash this module replaced -----------------------------


def _reference_members(src: Path):
    if src.is_dir():
        for path in sorted(src.rglob("*")):
            if path.is_file() and D._is_image(path.name):
                yield path.relative_to(src).as_posix(), path.read_bytes()
        return
    with tarfile.open(src, mode="r:*") as tar:
        for m in tar:
            if m.isfile() and D._is_image(m.name):
                f = tar.extractfile(m)
                if f is not None:
                    yield m.name, f.read()


def _reference_source_hash(src: Path) -> str:
    """Folders: the content key (path and bytes of each image file) that replaced (path, size, mtime)."""
    h = hashlib.sha256()
    if src.is_dir():
        for path in sorted(src.rglob("*")):
            if path.is_file() and D._is_image(path.name):
                digest = hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()
                h.update(f"{path.relative_to(src).as_posix()}\t{digest}\n".encode())
    else:
        h.update(src.read_bytes())
    return h.hexdigest()


def _reference_load(src: Path) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """(images, paths, hashes, skipped) exactly as the old, all-in-memory `load_source` built them."""
    entries: list[tuple[str, bytes]] = []
    for rel, raw in _reference_members(src):
        sp = D._split_path(rel)
        if sp is not None:
            entries.append((sp[2], raw))
    if not entries:
        raise PladaError(
            f"{src} holds no images in the ImageFolder layout NAME/<split>/<class>/<image> "
            "(or <split>/<class>/<image>)"
        )
    entries.sort(key=lambda e: e[0])
    if len({e[0] for e in entries}) != len(entries):
        raise PladaError(f"{src} lists the same image path twice")
    decoded = []
    skipped: list[str] = []
    for rel, raw in entries:
        try:
            decoded.append((rel, hashlib.blake2b(raw, digest_size=8).hexdigest(), D._decode(raw)))
        except Exception:
            skipped.append(rel)
    if not decoded:
        raise PladaError(f"no image in {src} could be decoded ({len(skipped)} unreadable)")
    sizes = {img.size for _, _, img in decoded}
    if len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1] and next(iter(sizes))[0] <= D.MAX_NATIVE:
        res = next(iter(sizes))[0]
    else:
        res = D.LARGE_RES
    images = np.empty((len(decoded), res, res, 3), dtype=np.uint8)
    for i, (_, _, img) in enumerate(decoded):
        images[i] = D._to_square(img, res)
    return images, [d[0] for d in decoded], [d[1] for d in decoded], skipped


def _reference_files(src: Path) -> tuple[bytes, bytes]:
    """The bytes of `images.npy` and `meta.json` the old implementation wrote for `src`."""
    images, paths, hashes, skipped = _reference_load(src)
    buf = io.BytesIO()
    np.save(buf, images)
    meta = {"version": D.CACHE_VERSION, "source": str(src), "paths": paths, "hashes": hashes, "skipped": skipped}
    return buf.getvalue(), json.dumps(meta, indent=1, sort_keys=True).encode()


# --- synthetic sources --------------------------------------------------------------------------------------


def png(rng: np.random.Generator, w: int, h: int | None = None, mode: str = "RGB") -> bytes:
    """A small noisy PNG (noise so neighbouring pixels differ and resizing is really exercised)."""
    arr = rng.integers(0, 256, ((h or w), w, 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def shuffled(files: dict[str, bytes], seed: int = 0) -> dict[str, bytes]:
    """The same files in a non-sorted storage order, so sorting is really tested."""
    items = list(files.items())
    random.Random(seed).shuffle(items)
    assert [k for k, _ in items] != sorted(files)
    return dict(items)


def write_tar(path: Path, files: dict[str, bytes], mode: str = "w") -> Path:
    """A tar (compressed as `mode` says) holding the given member names verbatim (no NAME/ prefix added)."""
    with tarfile.open(path, mode) as tar:
        for name, raw in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, raw in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(raw)
    return root


def grid(rng: np.random.Generator, sizes: list[tuple[int, int]]) -> dict[str, bytes]:
    """One image per size, spread over two splits and three classes, named so sorted != storage order."""
    files = {}
    for i, (w, h) in enumerate(sizes):
        split = ("train", "test")[i % 2]
        files[f"{split}/c{(i * 7) % 3}/img{(i * 37) % 101:03d}.png"] = png(rng, w, h)
    return files


def expected(raw: bytes, res: int) -> np.ndarray:
    return D._to_square(Image.open(io.BytesIO(raw)).convert("RGB"), res)


def cache_files(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) if cache.exists() else []


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- behaviour ----------------------------------------------------------------------------------------------


def test_native_size_sorted_order(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    files = grid(rng, [(32, 32)] * 24)
    src = write_archive(tmp_path / "same.tar", "same", shuffled(files))
    s = D.load_source(str(src), progress=True)  # the bars must not break anything
    assert s.resolution == 32 and s.images.shape == (24, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.paths == sorted(files) and s.skipped == []
    for i, rel in enumerate(s.paths):
        assert np.array_equal(s.images[i], np.asarray(Image.open(io.BytesIO(files[rel])).convert("RGB")))
        assert s.hashes[i] == hashlib.blake2b(files[rel], digest_size=8).hexdigest()
    assert "reading" in capsys.readouterr().err
    assert cache_files(cache) == [f"datasets/{s.root.name}/images.npy", f"datasets/{s.root.name}/meta.json"]


@pytest.mark.parametrize("sizes", [
    [(32, 32)] * 6 + [(48, 48)] + [(32, 32)] * 3 + [(40, 56), (100, 80)],  # native first, broken later
    [(40, 56)] + [(32, 32)] * 5,  # broken by the very first image (non-square)
    [(80, 80)] * 5,  # one size, square, but above MAX_NATIVE
    [(32, 32)] * 4 + [(16, 16)] * 2,  # all square and small, but two sizes
    [(64, 64)] * 3 + [(32, 32)],  # native LARGE_RES first: its rows are already final
], ids=["late-break", "first-nonsquare", "large-square", "two-small", "native-64"])
def test_large_resolution(sizes: list[tuple[int, int]], tmp_path: Path, cache: Path) -> None:
    rng = np.random.default_rng(1)
    files = grid(rng, sizes)
    src = write_archive(tmp_path / "mixed.tar", "mixed", files)  # stored in the sizes' order
    s = D.load_source(str(src), progress=False)
    assert s.resolution == D.LARGE_RES == 64
    assert s.paths == sorted(files)
    for i, rel in enumerate(s.paths):
        assert np.array_equal(s.images[i], expected(files[rel], 64)), rel


def test_native_64_is_native(tmp_path: Path, cache: Path) -> None:
    rng = np.random.default_rng(2)
    files = grid(rng, [(64, 64)] * 4)
    s = D.load_source(str(write_archive(tmp_path / "n64.tar", "n64", files)), progress=False)
    assert s.resolution == 64
    for i, rel in enumerate(s.paths):
        assert np.array_equal(s.images[i], np.asarray(Image.open(io.BytesIO(files[rel])).convert("RGB")))


def test_corrupt_images_skipped(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(3)
    files = grid(rng, [(32, 32)] * 8)
    good = png(rng, 32)
    bad = {"train/zz/garbage.png": os.urandom(300), "test/c0/empty.png": b"", "train/c1/cut.png": good[:60]}
    stored = {**dict(list(files.items())[:3]), **bad, **dict(list(files.items())[3:])}
    src = write_archive(tmp_path / "rotten.tar", "rotten", stored)
    s = D.load_source(str(src), progress=False)
    assert s.skipped == sorted(bad) and s.paths == sorted(files) and s.resolution == 32
    assert json.loads((s.root / "meta.json").read_text())["skipped"] == sorted(bad)
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert f"plada: warning: skipped 3 unreadable image(s) in rotten.tar, e.g. {sorted(bad)[0]}" in err
    D.load_source(str(src), progress=False)  # from the cache: said once, when built
    assert "warning" not in capsys.readouterr().err


def test_reload_from_cache(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    src = write_archive(tmp_path / "re.tar", "re", shuffled(grid(rng, [(32, 32)] * 5 + [(50, 40)])))
    first = D.load_source(str(src), progress=False)
    monkeypatch.setattr(D, "_decode", lambda raw: pytest.fail("decoded again instead of reading the cache"))
    second = D.load_source(str(src), progress=False)
    assert isinstance(second.images, np.memmap)
    assert np.array_equal(np.asarray(first.images), np.asarray(second.images))
    assert (first.paths, first.hashes, first.skipped) == (second.paths, second.hashes, second.skipped)


def _sources(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(5)
    out = [write_archive(tmp_path / "native.tar", "native", shuffled(grid(rng, [(32, 32)] * 30)))]
    mixed = grid(rng, [(32, 32)] * 10 + [(24, 40), (70, 70), (64, 64), (33, 31)] + [(32, 32)] * 6)
    mixed["train/modes/gray.png"] = png(rng, 32, 32, "L")
    mixed["train/modes/rgba.png"] = png(rng, 45, 30, "RGBA")
    mixed["train/modes/pal.png"] = png(rng, 32, 32, "P")
    mixed["test/modes/photo.jpg"] = jpeg(rng, 90, 60)
    mixed["test/modes/bad.png"] = b"\x89PNG\r\n\x1a\n garbage"
    out.append(write_archive(tmp_path / "mixed.tar", "mixed", shuffled(mixed, 1)))
    xz = {f"packed/{k}": v for k, v in grid(rng, [(32, 32)] * 6 + [(30, 30)]).items()}
    xz[f"packed/train/{'long' * 40}/x.png"] = png(rng, 32)  # a PAX long-name member
    out.append(write_tar(tmp_path / "packed.tar.xz", shuffled(xz, 2), "w:xz"))
    folder = grid(rng, [(32, 32)] * 12)
    nested = {f"foldr/{k}": v for k, v in folder.items()}  # NAME/split/class/img inside a folder
    nested |= {"notes.png": png(rng, 32), "a/b/c/d/e.png": png(rng, 32), "train/c0/readme.txt": b"hi"}
    out.append(write_folder(tmp_path / "foldr", nested))
    out.append(write_folder(tmp_path / "flatfolder", {**grid(rng, [(20, 20)] * 5 + [(20, 21)]),
                                                       "train/c0/x.bmp": os.urandom(50)}))
    return out


def test_byte_identical_to_reference(tmp_path: Path, cache: Path) -> None:
    for src in _sources(tmp_path):
        want_npy, want_meta = _reference_files(src)
        s = D.load_source(str(src), progress=False)
        assert (s.root / "images.npy").read_bytes() == want_npy, src.name
        assert (s.root / "meta.json").read_bytes() == want_meta, src.name
        assert s.root.name == f"{src.name.split('.tar')[0]}-{_reference_source_hash(src)[:16]}"


def test_member_order_unchanged(tmp_path: Path) -> None:
    """Folders are read (and hashed, for the cache key) in `sorted(rglob)` order, whatever the names."""
    names = ["a/x.png", "a-b/x.png", "a.b/x.png", "A/x.png", "a/b/x.png", "ab.png", ".hidden/x.png", "a/.x.png",
             "é/x.png", "a/x.PNG", "z/0.png", "a b/x.png", "a/x.png.txt"]
    src = write_folder(tmp_path / "tree", {n: n.encode() for n in names})
    (src / "link").symlink_to(src / "a", target_is_directory=True)  # listed, not entered: as rglob does
    (src / "flink.png").symlink_to(src / "ab.png")
    want = [(p.relative_to(src).as_posix(), p.read_bytes())
            for p in sorted(src.rglob("*")) if p.is_file() and D._is_image(p.name)]
    assert list(D._iter_members(src)) == want
    assert D.source_hash(src) == _reference_source_hash(src)


def _dup_tar(tmp_path: Path) -> Path:
    rng = np.random.default_rng(6)
    raw = png(rng, 32)
    files = {"dup/train/a/x.png": raw, "dup/train/a/y.png": raw, "other/train/a/x.png": raw}
    return write_tar(tmp_path / "dup.tar", files)


@pytest.mark.parametrize("make", [
    lambda p: write_archive(p / "flat.tar", "flat", {"a.png": b"x", "b.png": b"y"}),
    _dup_tar,
    lambda p: write_archive(p / "dead.tar", "dead", {"train/a/x.png": b"not a png", "train/b/y.png": b""}),
], ids=["layout", "duplicate", "undecodable"])
def test_errors_unchanged(make, tmp_path: Path, cache: Path) -> None:
    src = make(tmp_path)
    with pytest.raises(PladaError) as want:
        _reference_load(src)
    fds = open_fds()
    with pytest.raises(PladaError) as got:
        D.load_source(str(src), progress=False)
    assert str(got.value) == str(want.value)
    assert cache_files(cache) == [] and open_fds() == fds


@pytest.mark.parametrize("when", ["decoding", "writing"])
def test_interrupt_leaves_nothing(when: str, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C mid-build: no temporary file, no cache that looks complete, and the next run builds it right."""
    rng = np.random.default_rng(7)
    src = write_archive(tmp_path / "int.tar", "int", grid(rng, [(32, 32)] * 8 + [(48, 30)] * 4))
    want_npy, want_meta = _reference_files(src)
    real, calls = D._decode, []

    def decode(raw: bytes) -> Image.Image:
        calls.append(1)
        if len(calls) == 10:  # after the resolution switch
            raise KeyboardInterrupt
        return real(raw)

    fds = open_fds()
    with monkeypatch.context() as mp:  # not monkeypatch.undo(): that would drop PLADA_CACHE too
        if when == "decoding":
            mp.setattr(D, "_decode", decode)
        else:
            mp.setattr(D, "write_json_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            D.load_source(str(src), progress=False)
    assert open_fds() == fds
    left = cache_files(cache)
    assert not any("meta.json" in f or ".tmp" in f for f in left), left
    assert all(f.endswith("/images.npy") for f in left), left
    s = D.load_source(str(src), progress=False)
    assert (s.root / "images.npy").read_bytes() == want_npy and (s.root / "meta.json").read_bytes() == want_meta
    assert cache_files(cache) == [f"datasets/{s.root.name}/images.npy", f"datasets/{s.root.name}/meta.json"]


# --- memory -------------------------------------------------------------------------------------------------

N_NOISE = 2000


@pytest.fixture(scope="module")
def noise_pngs() -> dict[str, bytes]:
    """2000 noise PNGs of 64x64 (~12 kB each: noise does not compress), over 2 splits and 10 classes.

    Large enough that the build's fixed costs (1 MB hashing and copy buffers) sit far below the bound.
    """
    rng = np.random.default_rng(8)
    return {f"{('train', 'test')[i % 4 == 0]}/c{i % 10}/{i:05d}.png": png(rng, 64) for i in range(N_NOISE)}


@pytest.mark.parametrize("kind", ["folder", "tar"])
def test_memory_does_not_grow_with_source(kind: str, noise_pngs: dict[str, bytes], tmp_path: Path,
                                          cache: Path) -> None:
    """Peak traced allocations stay far below the source's raw bytes (the old build held them all, then pixels)."""
    if kind == "folder":
        src = write_folder(tmp_path / "noise", noise_pngs)
    else:
        src = write_archive(tmp_path / "noise.tar", "noise", shuffled(noise_pngs))
    raw_total = sum(len(v) for v in noise_pngs.values())
    tracemalloc.start()
    try:
        s = D.load_source(str(src), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"{kind}: raw {raw_total / 1e6:.1f} MB, pixels {s.images.nbytes / 1e6:.1f} MB, "
          f"peak traced {peak / 1e6:.2f} MB")
    assert len(s.paths) == N_NOISE and s.resolution == 64
    assert peak < raw_total / 4, f"peak {peak / 1e6:.1f} MB for {raw_total / 1e6:.1f} MB of raw images"
