"""Pools as users hold them (issue 18): full-resolution JPEG folders and WebDataset shards, decoded on access.

Every image here is a synthetic JPEG written to tmp_path: no data is committed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, run
from PIL import Image, ImageFile

from plada import backbones, images, score, train
from plada.data import _decode, _to_square
from plada.errors import PladaError
from plada.images import BatchStream, FolderFiles, LazyImages, decode, file_hash
from plada.pool import Pool, build_pool, export_manifest, open_pool
from plada.shards import open_any

CLASSES = ("n01440764", "n01443537", "n01484850")
RES = 96  # above the decoded cache's 64 px cap


def _jpeg(rng: np.random.Generator, w: int = 300, h: int = 200, quality: int = 90) -> bytes:
    """A photo-like JPEG: a random colour gradient plus noise (compresses like a photo, not like noise)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = rng.uniform(0, 255, 3)
    slope = rng.uniform(-0.6, 0.6, (2, 3))
    arr = base + x[..., None] * slope[0] + y[..., None] * slope[1] + rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _folder(root: Path, n: int = 40, seed: int = 0, **kw: int) -> dict[str, bytes]:
    """An ImageNet-style `root/<wnid>/<wnid>_<i>.JPEG` folder; returns {relative path: bytes}."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n):
        wnid = CLASSES[i % len(CLASSES)]
        rel = f"{wnid}/{wnid}_{i:04d}.JPEG"
        files[rel] = _jpeg(rng, **kw)
        (root / wnid).mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(files[rel])
    return files


def _shards(out: Path, files: dict[str, bytes], n_shards: int, seed: int, bare: bool = False) -> Path:
    """The same files as WebDataset shards: shuffled over `n_shards` tars under opaque keys.

    Samples carry their original name in `KEY.json` (as "filename" or "fname", alternately); one sample has
    no json and is keyed by its own path, so its name is KEY + extension. ``bare``: names without their
    class folder, as timm's ImageNet shards record them (`n01440764_0007.JPEG`).
    """
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True)
    order = rng.permutation(len(files))
    items = list(files.items())
    tars = [tarfile.open(out / f"train-{k:04d}.tar", "w") for k in range(n_shards)]
    try:
        for j, i in enumerate(order):
            rel, raw = items[i]
            rel = rel.rpartition("/")[2] if bare else rel
            tar = tars[j % n_shards]
            if j == 0:
                members = {rel: raw}  # key "n0.../n0..._0007", extension ".JPEG": the name is the path itself
            else:
                key = f"{rng.integers(1 << 40):012x}"
                which = "filename" if j % 2 else "fname"
                members = {f"{key}.jpg": raw, f"{key}.json": json.dumps({which: rel, "label": 3}).encode()}
            for name, data in (members.items() if j % 3 else reversed(members.items())):  # json first, sometimes
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    finally:
        for t in tars:
            t.close()
    return out


def _model(res: int = RES) -> backbones.Classifier:
    """A tiny seeded classifier at `res` (small-cnn is too slow at 96 px for a unit test on two cores)."""
    torch.manual_seed(0)
    embed = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 5, stride=2), torch.nn.GELU(), torch.nn.Conv2d(16, 32, 3),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return backbones.Classifier(embed, 32, 3, res, "tiny-test").eval()


@pytest.fixture()
def folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "imagenet" / "train"
    return root, _folder(root)


def test_folder_pool_scored_at_full_resolution(folder: tuple[Path, dict[str, bytes]], cache: Path,
                                               tmp_path: Path) -> None:
    """`plada pool build FOLDER` writes a manifest only; scoring decodes the JPEGs at the model's 96 px.

    The logits equal scoring the same files decoded beforehand into an in-memory pool (same decoder),
    chunk and batch boundaries included (chunk 16, batch 6: batches cross no chunk, the last is short).
    """
    root, files = folder
    pool = build_pool([str(root)], progress=False)
    assert isinstance(pool.images, LazyImages) and pool.name == "train"
    paths = sorted(files)
    assert list(pool.paths) == paths
    assert list(pool.hashes) == [hashlib.blake2b(files[p], digest_size=8).hexdigest() for p in paths]
    assert pool.fingerprint == hashlib.sha256((pool.root / "manifest.tsv").read_bytes()).hexdigest()
    version = pool.root / "current"
    assert version.is_symlink() and not (version / "images.npy").exists()  # no decoded copy
    assert not (pool.root / "images.npy").exists() and not (pool.root / "images.npy").is_symlink()
    assert sorted(os.listdir(version)) == ["manifest.tsv", "missing.npy", "pool.json"]
    assert json.loads((pool.root / "pool.json").read_text())["source"] == str(root.resolve())

    view = pool.images_at(RES)
    assert view.shape == (40, RES, RES, 3) and pool.images_at(images.DEFAULT_RES) is pool.images
    decoded = np.stack([decode(files[p], RES) for p in paths])
    # the decoded cache's own geometry (data._to_square), at a resolution it would never store
    assert np.array_equal(decoded[0], _to_square(_decode(files[paths[0]]), RES))

    model = _model()
    lazy = score.score_pool(model, pool, tmp_path / "s1", batch_size=6, progress=False, chunk=16)
    eager = Pool("eager", tmp_path, decoded, paths, list(pool.hashes), pool.fingerprint)
    ref = score.score_pool(model, eager, tmp_path / "s2", batch_size=6, progress=False, chunk=16)
    assert lazy.logits.shape == (40, 3) and np.array_equal(lazy.logits, ref.logits)
    again = score.score_pool(model, pool, tmp_path / "s1", batch_size=6, progress=False, chunk=16)  # from cache
    assert np.array_equal(again.logits, lazy.logits)

    reopened = open_pool("train", build=False)  # by name, as `--pool train` finds it
    assert isinstance(reopened.images, LazyImages) and reopened.fingerprint == pool.fingerprint
    assert np.array_equal(reopened.images_at(RES)[[3, 0, 39]], decoded[[3, 0, 39]])


def test_files_units_read_their_rows_and_refuse_another_pool(tmp_path: Path, cache: Path) -> None:
    """A Ray work unit of a folder pool names the pool and its fingerprint; a worker reads its rows at the asked size
    and refuses a pool whose fingerprint is not the driver's (a worker seeing another copy of the folder)."""
    from plada import engines

    root = tmp_path / "imagenet" / "train"
    files = _folder(root, n=10, w=60, h=40)
    pool = build_pool([str(root)], name="u", progress=False)
    units = engines.units_of(pool, 4)
    assert [(u.kind, u.start, u.stop) for u in units] == [("files", 0, 4), ("files", 4, 8), ("files", 8, 10)]
    want = np.stack([decode(files[p], 24) for p in sorted(files)[4:8]])
    assert np.array_equal(engines.load_unit(units[1], 24), want)
    with pytest.raises(PladaError, match="not the driver's"):
        engines.load_unit(engines.Unit(0, 4, "files", units[0].file, manifest="0" * 64), 24)


@pytest.mark.slow
def test_ray_actors_decode_folder_and_shard_pools_themselves(tmp_path: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray on a JPEG folder pool and on its WebDataset shards: each actor opens the pool and decodes its own rows
    at the teacher's size (nothing through the object store), and the logits are the local engine's."""
    import ray

    from plada import engines

    root = tmp_path / "imagenet" / "train"
    files = _folder(root)
    shards = _shards(tmp_path / "wds", files, 3, seed=1)
    torch.manual_seed(0)
    model = backbones.create("small-cnn", 3, 72, pretrained=False).eval()
    puts, ray_put = [], ray.put
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        monkeypatch.setattr(ray, "put", lambda x, *a, **k: puts.append(type(x).__name__) or ray_put(x, *a, **k))
        for src in (root, shards):
            pool = build_pool([str(src)], name=src.name, progress=False)
            assert isinstance(pool.images, LazyImages)
            ref = score.score_pool(model, pool, tmp_path / f"local-{src.name}", batch_size=8, progress=False, chunk=16)
            st = engines.RayStats()
            got = engines.score_pool_ray(model, pool, tmp_path / f"ray-{src.name}", actors=2, batch_size=8,
                                         progress=False, chunk=16, stats=st)
            assert st.actors == 2 and st.scored_units == 3  # 40 rows in chunks of 16
            assert np.array_equal(got.labels, ref.labels)
            np.testing.assert_allclose(got.logits, ref.logits, atol=1e-4, rtol=0)
        # the teacher's weights went through the object store, never an array of pixels (Ray Data puts its own
        # bookkeeping objects too)
        assert puts.count("dict") == 2 and "ndarray" not in puts
    finally:
        ray.shutdown()


def _pattern(rng: np.random.Generator, kind: int, w: int, h: int) -> bytes:
    """A JPEG of columns (0), rows (1), checks (2) or noise (3): textures a pretrained backbone tells apart."""
    y, x = np.mgrid[0:h, 0:w]
    period, phase = rng.uniform(10, 14), rng.uniform(0, 10)
    wave = [np.sin(2 * np.pi * (x + phase) / period), np.sin(2 * np.pi * (y + phase) / period)]
    v = [wave[0], wave[1], wave[0] * wave[1], rng.normal(0, 0.5, (h, w))][kind]
    arr = 128 + 100 * v[..., None] + rng.normal(0, 10, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_full_resolution_folders_end_to_end_at_96_px(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A JPEG folder pool and a folder target of 120x90 photos, sent and received at 96 px: every image is
    decoded from its file at 96 px (never through a 64-px copy), and the student, which only saw pool images,
    beats chance on the target's test photos by far."""
    rng = np.random.default_rng(0)
    pool_dir = tmp_path / "imagenet" / "train"
    for g in range(4):  # columns, rows, checks, noise; sizes vary, none square
        wnid = f"n{g:08d}"
        (pool_dir / wnid).mkdir(parents=True)
        for i in range(40):
            (pool_dir / wnid / f"{wnid}_{i}.JPEG").write_bytes(_pattern(rng, g, 100 + 2 * i, 80 + i))
    target = tmp_path / "photos"
    for split, n in (("train", 24), ("test", 12)):
        for kind, name in ((2, "checks"), (0, "columns"), (1, "rows")):
            (target / split / name).mkdir(parents=True)
            for i in range(n):
                (target / split / name / f"{i:03d}.jpg").write_bytes(_pattern(rng, kind, 120, 90))
    sizes = []
    real_decode = images.decode
    monkeypatch.setattr(images, "decode", lambda raw, res, *a: sizes.append(res) or real_decode(raw, res, *a))

    code, _, err = run(capsys, "pool", "build", str(pool_dir), "--name", "photos-pool")
    assert code == 0, err
    out = tmp_path / "t.plada"
    code, sent, err = run(capsys, "send", str(target), "--pool", "photos-pool", "-o", str(out),
                          "--set", "teacher.res=96", "--set", "teacher.mode=linear", "--keep", "30%",
                          "--policy", "random")
    assert code == 0, err
    assert sent["kept"] == 48 and sent["teacher_accuracy"] > 0.7  # chance is 1/3
    code, rec, err = run(capsys, "receive", str(out), "--pool", "photos-pool", "--test", str(target),
                         "--set", "student.res=96", "--student-mode", "linear")
    assert code == 0, err
    assert rec["student_accuracy"] > 0.6  # chance is 1/3 (0.72 measured)
    assert sizes and set(sizes) == {96}  # target and pool files alike, each straight to the model's size
    assert not list((cache / "datasets").glob("photos-*"))  # no decoded copy of the target was written


def test_target_folders_of_small_squares_keep_the_decoded_cache(tmp_path: Path, cache: Path) -> None:
    """Only a folder of large images is read from its files; small squares of one size (and every archive) keep
    `load_source`'s decoded cache, so every 64-px figure stays what it was."""
    from plada.data import load_source, open_target

    rng = np.random.default_rng(1)
    small, large = tmp_path / "small", tmp_path / "large"
    for root, size in ((small, 32), (large, 80)):
        for name in ("a", "b"):
            (root / "train" / name).mkdir(parents=True)
            for i in range(3):
                (root / "train" / name / f"{i}.jpg").write_bytes(_jpeg(rng, size, size))
    kept = open_target(str(small), progress=False)
    assert isinstance(kept.images, np.memmap) and kept.resolution == 32
    assert np.array_equal(kept.images, load_source(str(small), progress=False).images)
    lazy = open_target(str(large), progress=False)
    assert isinstance(lazy.images, LazyImages) and lazy.paths == sorted(lazy.paths)
    split = lazy.split("train")
    raw = (large / "train" / split.files[4]).read_bytes()
    assert np.array_equal(split.images.at(80)[4], decode(raw, 80)) and split.labels[4] == 1


def test_accelerator_loop_reads_the_stream(folder: tuple[Path, dict[str, bytes]], cache: Path) -> None:
    """`train._predict_on` (the GPU loop, here on the CPU) slices a `BatchStream` from its prefetch thread."""
    root, files = folder
    pool = build_pool([str(root)], progress=False)
    model = _model()
    view = pool.images_at(RES)
    ref = train.predict(model, view[:], batch_size=8, progress=False)
    rows = view.stream(0, 40, 8)
    try:
        got = train._predict_on(torch.device("cpu"), model, rows, 8, "t", False, False)
    finally:
        rows.close()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_shuffled_shards_give_the_folder_fingerprint(folder: tuple[Path, dict[str, bytes]], cache: Path,
                                                     tmp_path: Path) -> None:
    """The same images as WebDataset shards, in any shard count, order and shuffle: one manifest, one fingerprint."""
    root, files = folder
    by_folder = build_pool([str(root)], progress=False)
    a = build_pool([str(_shards(tmp_path / "wds-a", files, 3, seed=1))], name="wds-a", progress=False)
    b = build_pool([str(_shards(tmp_path / "wds-b", files, 5, seed=2))], name="wds-b", progress=False)
    assert a.fingerprint == b.fingerprint == by_folder.fingerprint
    assert (a.root / "manifest.tsv").read_bytes() == (by_folder.root / "manifest.tsv").read_bytes()
    want = by_folder.images_at(64)[:]
    assert np.array_equal(a.images_at(64)[:], want) and np.array_equal(b.images_at(64)[:], want)
    assert not len(a.images.bad)
    reopened = open_any("wds-b")  # every `--pool` path opens it: the manifest plus the shard index
    assert isinstance(reopened.images, LazyImages) and reopened.fingerprint == by_folder.fingerprint
    assert np.array_equal(reopened.images_at(64)[[5, 17]], want[[5, 17]])
    assert reopened.groups()[1] == list(CLASSES)


def test_bare_imagenet_names_in_shards_get_their_class_folder(folder: tuple[Path, dict[str, bytes]], cache: Path,
                                                              tmp_path: Path) -> None:
    """Shards naming `n01440764_0007.JPEG` without its folder: the folder pool's manifest, fingerprint, classes."""
    root, files = folder
    by_folder = build_pool([str(root)], progress=False)
    bare = build_pool([str(_shards(tmp_path / "wds-bare", files, 2, seed=3, bare=True))], name="wds-bare",
                      progress=False)
    assert (bare.root / "manifest.tsv").read_bytes() == (by_folder.root / "manifest.tsv").read_bytes()
    assert bare.fingerprint == by_folder.fingerprint and bare.groups()[1] == list(CLASSES)


def test_corrupt_and_truncated_files_read_as_zero_rows_named_once(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """Among 60 files, a corrupt and a truncated JPEG read as zeros, are counted and named in one line, once."""
    root = tmp_path / "f"
    files = _folder(root, n=60, w=120, h=90)
    paths = sorted(files)
    corrupt, cut = paths[7], paths[31]
    raw = bytearray(files[corrupt])
    raw[2:600] = os.urandom(598)  # header and tables destroyed
    (root / corrupt).write_bytes(bytes(raw))
    (root / cut).write_bytes(files[cut][: len(files[cut]) // 3])
    lazy = LazyImages(FolderFiles(root, paths), res=48, label="test pool", workers=2)
    got = np.concatenate(list(lazy.batches(0, 60, 16)))  # never raises
    assert got.shape == (60, 48, 48, 3)
    assert lazy.bad.tolist() == [7, 31] and not got[[7, 31]].any()
    good = np.setdiff1d(np.arange(60), [7, 31])
    assert np.array_equal(got[good], np.stack([decode(files[paths[i]], 48) for i in good]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("plada: warning: 2 image(s) of test pool read as zeros")
    assert corrupt in err[0] and cut in err[0] and "truncated" in err[0]
    lazy.at(32)[5:40]  # read again, at another size: nothing new to say
    assert lazy.at(32).bad.tolist() == [7, 31] and capsys.readouterr().err == ""


def test_decoding_in_worker_processes_gives_the_same_rows(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """PLADA_DECODE_PROCESSES=2: the same pixels, bad rows and warning as threads, and the same pool scores."""
    root = tmp_path / "f"
    files = _folder(root, n=50, w=120, h=90)
    paths = sorted(files)
    (root / paths[9]).write_bytes(files[paths[9]][:200])  # truncated: a zero row, named once
    threads = LazyImages(FolderFiles(root, paths), res=40, label="test pool", workers=2)
    want = np.concatenate(list(threads.batches(5, 50, 8)))
    capsys.readouterr()
    monkeypatch.setenv(images.PROCESSES_ENV, "2")
    procs = LazyImages(FolderFiles(root, paths), res=40, label="test pool", workers=2)
    got = list(procs.batches(5, 50, 8))
    assert [len(b) for b in got] == [8, 8, 8, 8, 8, 5] and np.array_equal(np.concatenate(got), want)
    assert procs.bad.tolist() == threads.bad.tolist() == [9] and not want[4].any()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 image(s) of test pool read as zeros" in err[0] and paths[9] in err[0]
    pool = build_pool([str(root)], progress=False)
    model = _model()
    a = score.score_pool(model, pool, tmp_path / "sp", batch_size=7, progress=False, chunk=20)
    monkeypatch.setenv(images.PROCESSES_ENV, "0")
    b = score.score_pool(model, pool, tmp_path / "st", batch_size=7, progress=False, chunk=20)
    assert np.array_equal(a.logits, b.logits)
    for bad in ("-1", "two", "1000"):
        monkeypatch.setenv(images.PROCESSES_ENV, bad)
        with pytest.raises(PladaError, match="PLADA_DECODE_PROCESSES must be an integer") as e:
            list(procs.batches(0, 20, 8))
        assert one_line(str(e.value))


def test_bad_files_in_a_folder_pool_never_abort_the_run(tmp_path: Path, cache: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    """Build: a corrupt file is left out of the manifest (counted in `skipped`, named once). Scoring: a
    truncated file, and one edited after the build, read as zeros and are named once in one line."""
    root = tmp_path / "train"
    files = _folder(root, n=30, w=120, h=90)
    paths = sorted(files)
    (root / CLASSES[0] / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / paths[4]).write_bytes(files[paths[4]][: len(files[paths[4]]) // 2])  # header intact, data cut
    pool = build_pool([str(root)], progress=False)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.JPEG" in err[0] and "left 1 file(s)" in err[0]
    assert pool.skipped == 1 and len(pool) == 30 and f"{CLASSES[0]}/broken.JPEG" not in pool.paths
    (root / paths[9]).write_bytes(files[paths[10]])  # edited since the build: its hash no longer matches
    s = score.score_pool(_model(48), pool, tmp_path / "s", batch_size=8, progress=False, chunk=8)
    assert s.logits.shape == (30, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2 image(s)" in err[0] and paths[4] in err[0] and paths[9] in err[0]
    assert "changed since the pool was built" in err[0]
    assert pool.images.bad.tolist() == [4, 9]


def _png_header_bomb(w: int, h: int) -> bytes:
    """A 100-byte PNG declaring w x h RGB pixels (a valid IHDR, a token IDAT): a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _jpeg_header_bomb(w: int, h: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is rewritten to declare w x h."""
    raw = bytearray(_jpeg(np.random.default_rng(3), 64, 48))
    at = raw.index(b"\xff\xc0")
    raw[at + 5 : at + 9] = struct.pack(">HH", h, w)
    return bytes(raw)


def test_decompression_bomb_refused_from_its_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    cache: Path, capsys: pytest.CaptureFixture) -> None:
    """A header declaring 60000 x 60000 (10.8 GB of RGB) is refused before any pixel is read or allocated,
    also with PIL's own limit switched off; `max_pixels` is the rule for moderate sizes too."""
    loads: list[tuple[int, int]] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        loads.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a program that disabled PIL's check: ours still holds
    bombs = {"png": _png_header_bomb(60000, 60000), "jpg": _jpeg_header_bomb(60000, 60000)}
    for kind, raw in bombs.items():
        assert len(raw) < 4000
        with Image.open(io.BytesIO(raw)) as img:
            assert img.size == (60000, 60000), kind  # the header really claims it
        tracemalloc.start()
        t0 = time.perf_counter()
        with pytest.raises(images.BadImage, match="60000x60000"):
            decode(raw, 224)
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert took < 0.5 and peak < 1 << 20, (kind, took, peak)
    assert loads == []  # PIL never got as far as reading pixels
    decode(_jpeg(np.random.default_rng(0), 64, 48), 32)
    assert set(loads) == {(64, 48)}  # (the spy sees real decodes)
    big = _jpeg(np.random.default_rng(0), 1200, 1000)
    with pytest.raises(images.BadImage, match="limit 1000000"):
        decode(big, 32, max_pixels=1_000_000)
    assert set(loads) == {(64, 48)}

    root = tmp_path / "train"
    files = _folder(root, n=6, w=80, h=60)
    (root / CLASSES[1] / "bomb.png").write_bytes(bombs["png"])
    pool = build_pool([str(root)], progress=False)  # left out at build, from the header alone
    assert pool.skipped == 1 and len(pool) == len(files) and "bomb.png" in capsys.readouterr().err
    paths = sorted([*files, f"{CLASSES[1]}/bomb.png"])
    lazy = LazyImages(FolderFiles(root, paths), res=32, workers=1)  # and read as zeros if it gets in anyway
    out = lazy[:]
    assert lazy.bad.tolist() == [paths.index(f"{CLASSES[1]}/bomb.png")] and set(loads) == {(64, 48), (80, 60)}
    assert not out[lazy.bad].any()


def test_draft_mode_for_large_jpegs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1600 x 1200 JPEG for 96 px is decoded at 1/4 size in the DCT domain, and looks the same."""
    raw = _jpeg(np.random.default_rng(5), 1600, 1200)
    from PIL import JpegImagePlugin

    drafts: list[tuple[int, int] | None] = []
    real_jpeg = JpegImagePlugin.JpegImageFile.draft

    def jpeg_spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        drafts.append(size)
        return real_jpeg(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", jpeg_spy)
    fast = decode(raw, RES)
    assert drafts == [(256, 192)]  # 2 x the resized size: libjpeg picks 1/4 (400 x 300)
    full = _to_square(_decode(raw), RES)
    assert fast.shape == full.shape == (RES, RES, 3)
    assert np.abs(fast.astype(int) - full).mean() < 2.0
    drafts.clear()
    decode(_jpeg(np.random.default_rng(5), 300, 200), RES)  # not much larger than needed: no draft
    assert drafts == []


def test_lazy_images_index_like_an_array(folder: tuple[Path, dict[str, bytes]]) -> None:
    root, files = folder
    paths = sorted(files)
    lazy = LazyImages(FolderFiles(root, paths), res=40, workers=2)
    full = np.stack([decode(files[p], 40) for p in paths])
    assert lazy.shape == (40, 40, 40, 3) and len(lazy) == 40 and lazy.dtype == np.uint8
    assert np.array_equal(lazy[3], full[3]) and np.array_equal(lazy[-1], full[-1])
    assert np.array_equal(lazy[5:30:4], full[5:30:4]) and lazy[7:7].shape == (0, 40, 40, 3)
    idx = np.array([9, 2, 2, -3])
    assert np.array_equal(lazy[idx], full[idx]) and np.array_equal(lazy[[1, 0]], full[[1, 0]])
    mask = np.zeros(40, bool)
    mask[[0, 11, 39]] = True
    assert np.array_equal(lazy[mask], full[mask])
    assert np.array_equal(np.asarray(lazy), full)
    for bad in (40, -41):
        with pytest.raises(IndexError):
            lazy[bad]
    with pytest.raises(IndexError):
        lazy[np.array([0, 40])]
    got = list(lazy.batches(3, 38, 8))
    assert [len(b) for b in got] == [8, 8, 8, 8, 3] and np.array_equal(np.concatenate(got), full[3:38])
    stream = lazy.stream(8, 40, 10)
    assert isinstance(stream, BatchStream) and stream.shape == (32, 40, 40, 3)
    assert np.array_equal(stream[0:10], full[8:18]) and np.array_equal(stream[10:20], full[18:28])
    assert np.array_equal(stream[25:27], full[33:35])  # out of order: decoded on the spot, still right
    stream.close()


def test_shard_names_and_duplicates(tmp_path: Path, cache: Path) -> None:
    """Without a json a sample is named KEY + extension; two samples of one name are refused by name."""
    rng = np.random.default_rng(0)
    out = tmp_path / "wds"
    out.mkdir()
    one, two = _jpeg(rng, 40, 30), _jpeg(rng, 40, 30)
    with tarfile.open(out / "a.tar", "w") as tar:
        for name, raw in (("cls/x.jpg", one), ("cls/y.webp.json", b"{}"), ("y.jpeg", two), ("z.cls", b"3")):
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    pool = build_pool([str(out)], progress=False)
    assert list(pool.paths) == ["cls/x.jpg", "y.jpeg"] and pool.hashes[1] == file_hash(two)
    with tarfile.open(out / "b.tar", "w") as tar:
        raw = json.dumps({"filename": "y.jpeg"}).encode()
        for name, data in (("k1.jpg", one), ("k1.json", raw)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(PladaError, match=r"hold the image 'y.jpeg' twice \(a.tar, b.tar\)"):
        build_pool([str(out)], name="wds2", progress=False)


def test_receiver_builds_a_folder_pool_from_the_published_manifest(folder: tuple[Path, dict[str, bytes]],
                                                                   cache: Path, tmp_path: Path) -> None:
    """A receiver lacking one file (and holding another with other bytes) gets the sender's fingerprint and
    the two rows flagged missing: they read as zeros, without touching their files."""
    root, files = folder
    sender = build_pool([str(root)], progress=False)
    published = export_manifest(sender, tmp_path / "pool.tsv")
    theirs = tmp_path / "theirs"
    _folder(theirs)
    paths = sorted(files)
    (theirs / paths[2]).unlink()
    (theirs / paths[5]).write_bytes(files[paths[6]])
    pool = build_pool([str(theirs)], name="theirs", manifest=published, progress=False)
    assert pool.fingerprint == sender.fingerprint and np.flatnonzero(pool.missing).tolist() == [2, 5]
    got = pool.images_at(48)[:]
    assert not got[[2, 5]].any() and got[[0, 1, 3]].reshape(3, -1).any(1).all() and not len(pool.images.bad)


def test_cli_pool_build_folder_and_moved_folder(folder: tuple[Path, dict[str, bytes]], cache: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """`plada pool build FOLDER` through the real CLI; a pool whose folder moved away is a one-line error."""
    root, _ = folder
    code, out, _ = run(capsys, "pool", "build", str(root), "--name", "in1k")
    assert code == 0 and out["size"] == 40 and out["skipped"] == 0
    code, exported, _ = run(capsys, "pool", "export", "in1k", "-o", str(tmp_path / "m.tsv"))
    assert code == 0 and exported["fingerprint"] == out["fingerprint"]
    code, _, err = run(capsys, "pool", "build", str(root), str(root))
    assert code == 2 and one_line(err) and "a pool on its own" in err
    root.rename(tmp_path / "elsewhere")
    code, _, err = run(capsys, "pool", "export", "in1k", "-o", str(tmp_path / "m2.tsv"))
    assert code == 2 and one_line(err) and "which is not there" in err


def test_decoded_pools_keep_their_path(tiny_data: Path, cache: Path, tmp_path: Path) -> None:
    """An archive source still builds the decoded pool; `images_at` hands back its memmap itself, so scoring
    slices exactly what it always sliced."""
    pool = build_pool(["tinypool"], tiny_data, progress=False)
    assert isinstance(pool.images, np.memmap) and pool.images.shape[1:] == (32, 32, 3)
    assert pool.images_at(RES) is pool.images and (pool.root / "current" / "images.npy").is_file()
    assert "kind" not in json.loads((pool.root / "pool.json").read_text())
    model = _model()
    s = score.score_pool(model, pool, tmp_path / "s", batch_size=64, progress=False, chunk=100)
    ref = np.concatenate([train.predict(model, pool.images[a : a + 100], batch_size=64, progress=False)
                          for a in range(0, len(pool), 100)])
    assert np.array_equal(s.logits, ref)


def test_send_refuses_a_pool_whose_files_broke_after_the_build(tiny_data: Path, cache: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """A file that fails its hash check reads as zeros: the sender stops, names it, and writes nothing."""
    folder = tmp_path / "jpegs"
    files = _folder(folder, n=24, w=80, h=60)
    code, built, err = run(capsys, "pool", "build", str(folder), "--name", "jp")
    assert code == 0, err
    broken = sorted(files)[5]
    (folder / broken).write_bytes(b"not a jpeg any more")
    out = tmp_path / "t.plada"
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "jp", "--data", str(tiny_data), "-o", str(out),
                       "--set", "teacher.res=32", "--set", "teacher.mode=linear", "--keep", "25%")
    assert code == 2 and one_line(err.splitlines()[-1]) and "changed or became unreadable" in err
    assert broken in err and not out.exists() and not (tmp_path / "t.plada.json").exists()


def test_folder_manifest_streams_in_sorted_path_order(tmp_path: Path, cache: Path) -> None:
    """The walk yields paths in manifest order without sorting them all: names that sort around "/" included.

    "a.b" and "a-b" sort before "a/" byte-wise but after "a" as folder names; a folder-by-folder walk sorted by
    name alone would list "a/..." first and give a manifest that `Manifest.parse` refuses as unsorted.
    """
    rng = np.random.default_rng(0)
    names = ["a/x.jpg", "a.b/y.jpg", "a-b.jpg", "a b/z.jpg", "a0.jpg", "a/b/c.jpg", "a/b.jpg", "ab/q.jpg",
             "Z/upper.jpg", "é/accent.jpg", "a/b-c/d.jpg", "a/b.c.jpg"]
    root = tmp_path / "tricky"
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(_jpeg(rng, 40, 30))
    (root / "notes.txt").write_text("not an image")
    got = images.scan_folder(root, progress=False)
    assert list(got.paths) == sorted(names)
    assert list(got.hashes) == [file_hash((root / n).read_bytes()) for n in sorted(names)]
    pool = build_pool([str(root)], name="tricky", progress=False)
    assert list(pool.paths) == sorted(names) and len(pool) == len(names)


def test_folder_file_name_with_a_tab_is_refused_by_name(tmp_path: Path, cache: Path) -> None:
    """A streamed manifest still refuses, naming the file, a path no manifest line can hold."""
    rng = np.random.default_rng(1)
    root = tmp_path / "tabbed"
    root.mkdir()
    (root / "ok.jpg").write_bytes(_jpeg(rng, 40, 30))
    (root / "bad\tname.jpg").write_bytes(_jpeg(rng, 40, 30))
    with pytest.raises(PladaError, match=r"cannot be stored in a pool manifest.*bad\\tname"):
        build_pool([str(root)], name="tabbed", progress=False)


def test_random_resized_crop_boxes_and_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crop box lies in the image with the recipe's area share and ratio; its pixels are PIL's crop-resize
    of the fully decoded file; a large JPEG is DCT-drafted only as far as a small crop still allows."""
    rng = np.random.default_rng(3)
    for u in rng.random((400, 4)):
        x0, y0, x1, y1 = images.crop_box(300, 200, u)
        assert -1e-9 <= x0 < x1 <= 300 + 1e-9 and -1e-9 <= y0 < y1 <= 200 + 1e-9
        share, ratio = (x1 - x0) * (y1 - y0) / 60000, (x1 - x0) / (y1 - y0)
        if x1 - x0 < 300 - 1e-6 and y1 - y0 < 200 - 1e-6:  # not clamped: exactly the drawn share and ratio
            assert images.RRC_SCALE[0] - 1e-9 <= share <= images.RRC_SCALE[1] + 1e-9
            assert images.RRC_RATIO[0] - 1e-9 <= ratio <= images.RRC_RATIO[1] + 1e-9
    assert images.crop_box(300, 200, [0.0, 0.5, 0.0, 0.0]) == pytest.approx((0, 0, 69.282, 69.282), abs=1e-3)
    assert images.crop_box(300, 200, [0.0, 0.5, 1.0, 1.0])[2:] == pytest.approx((300, 200))

    raw = _jpeg(rng, 300, 200)
    full = _decode(raw)
    for u in ([0.3, 0.2, 0.7, 0.1], [0.999, 0.5, 0.5, 0.5]):
        want = np.asarray(full.resize((RES, RES), Image.BILINEAR, box=images.crop_box(300, 200, u)))
        assert np.array_equal(images.decode_crop(raw, RES, u), want)
    a, b = images.decode_crop(raw, RES, [0.1, 0.5, 0.0, 0.5]), images.decode_crop(raw, RES, [0.1, 0.5, 1.0, 0.5])
    assert not np.array_equal(a, b)  # left and right edges of the image: different pixels

    from PIL import JpegImagePlugin

    drafts: list[tuple[int, int] | None] = []
    real_jpeg = JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft",
                        lambda self, mode, size: drafts.append(size) or real_jpeg(self, mode, size))
    big = _jpeg(rng, 1600, 1200)
    whole = images.decode_crop(big, RES, [0.999, 0.5, 0.5, 0.5])
    assert drafts == [(256, 192)]  # the crop is (nearly) the whole image: as `decode` drafts
    drafts.clear()
    small = images.decode_crop(big, RES, [0.0, 0.5, 0.5, 0.5])  # 8% of the area: 392 px a side
    assert drafts == [(784, 588)] and small.shape == whole.shape == (RES, RES, 3)  # libjpeg: 1/2, not 1/4
    box = images.crop_box(1600, 1200, [0.999, 0.5, 0.5, 0.5])
    ref = np.asarray(_decode(big).resize((RES, RES), Image.BILINEAR, box=box))
    assert np.abs(whole.astype(int) - ref).mean() < 2.0  # drafted, and still the same picture


def test_fit_on_files_trains_on_random_resized_crops(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """`train.fit` reads a file-backed pool through `LazyImages.crops` (same seed, same losses, whatever the
    decoding threads), an array through translations; `take` keeps rows undecoded, bad ones named by path."""
    root = tmp_path / "f"
    files = _folder(root, n=24, w=160, h=120)
    paths = sorted(files)
    (root / paths[5]).write_bytes(files[paths[5]][:200])  # truncated
    lazy = LazyImages(FolderFiles(root, paths), res=48, label="test pool", workers=2)
    draws = np.random.default_rng(0).random((6, 4))
    one = LazyImages(FolderFiles(root, paths), res=48, workers=1).crops([0, 5, 9, 2, 2, 23], draws)
    got = lazy.crops([0, 5, 9, 2, 2, 23], draws)
    assert np.array_equal(got, one) and not got[1].any() and got[[0, 2, 3, 4, 5]].reshape(5, -1).any(1).all()
    assert not np.array_equal(got[3], got[4])  # one file, two crops
    assert np.array_equal(got[0], images.decode_crop(files[paths[0]], 48, draws[0]))
    assert paths[5] in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"\(2, 4\) draws"):
        lazy.crops([0, 1], draws)

    sub = lazy.take([9, 5, 0])
    assert isinstance(sub, LazyImages) and sub.shape == (3, 48, 48, 3)
    assert np.array_equal(sub[:], np.stack([lazy[9], np.zeros((48, 48, 3), np.uint8), lazy[0]]))
    assert sub.bad.tolist() == [1] and paths[5] in capsys.readouterr().err  # named by its own path

    calls: list[int] = []
    real = LazyImages.crops
    monkeypatch.setattr(LazyImages, "crops", lambda self, key, d: calls.append(len(key)) or real(self, key, d))
    labels = np.arange(24) % 3
    losses = [train.fit(_model(48), lazy, labels, epochs=2, batch_size=8, seed=1, progress=False) for _ in range(2)]
    assert calls == [8] * 12 and losses[0] == losses[1]
    calls.clear()
    train.fit(_model(48), np.asarray(lazy), labels, epochs=1, batch_size=8, seed=1, progress=False)
    train.fit(_model(48), lazy, labels, epochs=1, batch_size=8, seed=1, progress=False, augment=False)
    assert calls == []  # a decoded array is translated; no augmentation reads centre crops
