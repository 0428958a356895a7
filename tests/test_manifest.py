"""The byte-backed manifest accepts exactly what the plain line-by-line reading accepts, in bounded chunks."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plada import manifest
from plada.errors import PladaError
from plada.manifest import Manifest, folder_groups, manifest_text
from plada.pool import Pool, open_pool

_HASH = re.compile(r"[0-9a-f]{16}")


def reference(raw: bytes) -> tuple[list[str], list[str]] | str:
    """The obvious reading of the format (the one plada used before): a verdict to compare with."""
    try:
        lines = raw.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        return "utf8"
    if not raw or lines[-1] != "":
        return "newline"
    paths, hashes = [], []
    for n, line in enumerate(lines[:-1], 1):
        p, tab, h = line.partition("\t")
        if not tab or not p or "\r" in line or "\0" in line or not _HASH.fullmatch(h):
            return f"line {n}"
        paths.append(p)
        hashes.append(h)
    if len(set(paths)) != len(paths):
        return "twice"
    if paths != sorted(paths):
        return "order"
    return paths, hashes


def verdict(raw: bytes) -> tuple[list[str], list[str]] | str:
    try:
        m = Manifest.parse(raw)
    except PladaError as e:
        s = str(e)
        assert "\n" not in s
        for key, name in (("UTF-8", "utf8"), ("newline", "newline"), ("twice", "twice"), ("pool order", "order")):
            if key in s:
                return name
        return re.search(r"line \d+", s).group(0)
    return list(m.paths), list(m.hashes)


def random_manifest(rng: random.Random) -> bytes:
    alphabet = "ab/é ü日z"
    paths = sorted({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 9))})
    if rng.random() < 0.15:
        rng.shuffle(paths)
    text = "".join(f"{p}\t{rng.getrandbits(64):016x}\n" for p in paths)
    raw = bytearray(text.encode())
    r = rng.random()
    if r < 0.3:
        i = rng.randrange(len(raw))
        raw[i : i + 1] = rng.choice(["\t", "\r", "\0", "\n", "x", "/", "é", "A", ""]).encode()
    elif r < 0.35:
        raw = raw[:-1]
    elif r < 0.4:
        raw += b"\xff\n"
    return bytes(raw)


@pytest.mark.parametrize("chunk", [manifest._CHUNK_BYTES, 64, 16])  # 64 and 16 bytes: tiny chunks, runs of one line
def test_agrees_with_the_plain_reading(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "_CHUNK_BYTES", chunk)
    rng = random.Random(chunk)
    verdicts = set()
    for _ in range(1500):
        raw = random_manifest(rng)
        want = reference(raw)
        assert verdict(raw) == want, raw
        verdicts.add(want if isinstance(want, str) and not want.startswith("line") else type(want).__name__)
    assert {"tuple", "utf8", "newline", "order"} <= verdicts  # the generator reached the interesting cases


def test_long_sorted_manifest_in_small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "_CHUNK_BYTES", 256)
    paths = sorted(f"src/train/c{i % 7}/{'x' * (i % 13)}{i}.png" for i in range(3000))
    hashes = [f"{i:016x}" for i in range(3000)]
    m = Manifest.of(paths, hashes)
    assert m.paths == paths and m.hashes == hashes and len(m) == 3000
    for i, j in [(0, 1), (1499, 1500), (2998, 2999)]:  # a swap or a duplicate anywhere, chunk edges included
        bad = list(paths)
        bad[i], bad[j] = bad[j], bad[i]
        with pytest.raises(PladaError, match="pool order"):
            Manifest.of(bad, hashes)
        bad = list(paths)
        bad[j] = bad[i]
        with pytest.raises(PladaError, match="twice"):
            Manifest.of(bad, hashes)


def test_columns_behave_like_lists() -> None:
    paths, hashes = ["a/1", "a/2", "b/é"], ["0" * 16, "1" * 16, "f" * 16]
    m = Manifest.of(paths, hashes)
    assert m.paths[-1] == "b/é" and m.hashes[0] == "0" * 16 and m.paths[1:] == ["a/2", "b/é"]
    assert list(m.paths) == paths and m.paths == tuple(paths) and m.paths != paths[:2]
    with pytest.raises(IndexError):
        m.paths[3]
    assert manifest_text(m.paths, m.hashes) is m.raw  # no re-encoding of a view
    assert manifest_text(paths, hashes) == m.raw


def test_held_memory_is_the_bytes_plus_an_offset() -> None:
    n = 20000
    raw = "".join(f"pool/train/c{i // 500:03d}/{i:06d}.png\t{i:016x}\n" for i in range(n)).encode()
    m = Manifest.parse(raw)
    assert m._ends.nbytes == 8 * n and m.raw is raw
    assert m.paths[12345] == "pool/train/c024/012345.png" and m.hashes[12345] == f"{12345:016x}"
    assert np.array_equal(np.frombuffer(raw, np.uint8)[m._ends], np.full(n, 0x0A, np.uint8))


def python_groups(paths: list[str]) -> tuple[np.ndarray, list[str]]:
    """The rule `Pool.groups` used before, a `str` per path (kept for plain lists): what numpy must give exactly."""
    return folder_groups(list(paths))


def assert_same_groups(paths: list[str]) -> None:
    want_ids, want_names = python_groups(paths)
    m = Manifest.of(paths, [f"{i:016x}" for i in range(len(paths))])
    for ids, names in (m.folders(), folder_groups(m.paths)):
        assert ids.dtype == np.int64 and ids.shape == (len(paths),)
        assert np.array_equal(ids, want_ids) and names == want_names, paths


_PATH = st.text("ab/é日z", min_size=1, max_size=9)


@settings(max_examples=400, deadline=None)
@given(paths=st.lists(_PATH, min_size=1, max_size=40, unique=True), block=st.sampled_from([1, 7, 40, 1 << 22]))
def test_folders_agree_with_the_python_rule(paths: list[str], block: int) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(manifest, "_FOLDER_BYTES", block)  # tiny blocks: runs of equal folders cut at block edges
        assert_same_groups(sorted(paths))


@pytest.mark.parametrize("block", [1, 50, 256, manifest._FOLDER_BYTES])
def test_folders_of_hand_picked_paths(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "_FOLDER_BYTES", block)
    cases = [
        ["a/b/1", "a/c", "a/d/2"],  # folders a/b, a, a/d: not contiguous, so runs repeat a folder
        ["a/b/1", "a/b/2", "a/c", "a/d", "a/d/2", "a/e"],
        ["x", "y.png", "z"],  # no "/": the folder is the whole path, as `rsplit("/", 1)[0]` gives
        ["/", "//", "/a", "/b", "a/", "a//", "a//b", "a/b"],  # empty folders, trailing and doubled "/"
        ["日本/é/1", "日本/é/2", "日本/ü", "日本/ü/x", "日本z", "é/1"],  # multi-byte folders of equal byte length
        ["ab/1", "ac/1", "ba/1", "bb/1"],  # equal folder lengths, different bytes
        [f"src/train/c{i % 7}/{'x' * (i % 13)}{i}.png" for i in range(3000)],  # long runs across many blocks
    ]
    for paths in cases:
        assert_same_groups(sorted(paths))


def test_pool_opened_from_a_manifest_groups_in_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifest, "_FOLDER_BYTES", 200)
    rng = random.Random(3)
    paths = sorted({f"pool/{rng.choice(['train', 'val'])}/n{rng.randrange(12):02d}é/{rng.randrange(10**6)}.JPEG"
                    for _ in range(800)} | {"pool/README", "top.png", "pool/train/x/y/z.png"})
    raw = manifest_text(paths, [f"{rng.getrandbits(64):016x}" for _ in paths])
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "manifest.tsv").write_bytes(raw)
    np.save(folder / "images.npy", np.zeros((len(paths), 2, 2, 3), dtype=np.uint8))
    (folder / "pool.json").write_text(json.dumps({"name": "p", "fingerprint": hashlib.sha256(raw).hexdigest()}))
    pool = open_pool(folder, build=False)
    assert isinstance(pool.paths, manifest._Column)  # the numpy reading, not the list one
    ids, names = pool.groups()
    want_ids, want_names = python_groups(paths)
    assert np.array_equal(ids, want_ids) and names == want_names and ids.dtype == np.int64
    assert pool.groups()[0] is ids  # computed once
    plain = Pool("p", folder, pool.images, list(paths), list(pool.hashes), pool.fingerprint)
    assert np.array_equal(plain.groups()[0], ids) and plain.groups()[1] == names
