"""A pool stored as WebDataset-style tar shards, for pools too big for one memory-mapped array.

Why shards: a 14M-image pool does not fit one machine's RAM, is copied to many machines, and is
read by many workers at once. Tar shards are what distributed readers stream (one sequential read
per shard, no random access), and each worker then holds one shard at a time, whatever the pool's
size.

Layout of a sharded pool folder: `pool-000000.tar`, `pool-000001.tar`, ... where each image is two
members, `<key>.npy` (its uint8 `(R, R, 3)` array) or `<key>.png`, and `<key>.json` holding its
manifest `path` and `hash` plus a `pixels` digest of the stored array; beside them the pool's
`manifest.tsv` (the same bytes as the unsharded pool's, so the same fingerprint), `missing.npy` and
`pool.json`, which lists each shard's manifest range `[start, stop)`.

The manifest, not the shards, fixes the order: a member lands at the position of its `path` in the
manifest, and only there if its hash agrees, so shards can be read in any order (or by workers that
finish in any order) and still give the pool in manifest order. A member outside its shard's range,
with another hash, or with damaged pixels is refused, never silently placed. Rows the pool lacks
(`missing`) are not stored; they read back as zeros, as in an unsharded pool.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import atomic_save_npy, atomic_write, building_dir, write_json_atomic
from .errors import PladaError
from .pool import Pool, manifest_text, open_pool, pools_dir, read_manifest

FORMAT = "webdataset-shards"
ENCODINGS = ("npy", "png")
SHARD_SIZE = 10000


@dataclass(frozen=True)
class Shard:
    """One tar file and the manifest range `[start, stop)` it stores (`count` rows held)."""

    file: str
    start: int
    stop: int
    count: int
    offset: int  # byte offset of line `start` in manifest.tsv: a worker reads only its slice


def _pixels_digest(arr: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(arr).tobytes(), digest_size=8).hexdigest()


def _encode(arr: np.ndarray, encoding: str) -> bytes:
    buf = io.BytesIO()
    if encoding == "npy":
        np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    else:
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _npy_header(res: int) -> bytes:
    """The `.npy` header our writer gives an `(res, res, 3)` uint8 image: matching its bytes is much
    cheaper than parsing it, and parsing costs more than copying the pixels."""
    buf = io.BytesIO()
    np.save(buf, np.zeros((res, res, 3), np.uint8), allow_pickle=False)
    return buf.getvalue()[: -res * res * 3]


def _decode(raw: bytes, ext: str, res: int, npy_header: bytes) -> np.ndarray:
    if ext == "npy":
        if raw.startswith(npy_header) and len(raw) == len(npy_header) + res * res * 3:
            return np.frombuffer(raw, np.uint8, offset=len(npy_header)).reshape(res, res, 3)
        return np.load(io.BytesIO(raw), allow_pickle=False)
    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _add(tar: tarfile.TarFile, name: str, raw: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same pool gives byte-identical shards
    info.size, info.mtime, info.mode = len(raw), 0, 0o644
    tar.addfile(info, io.BytesIO(raw))


def _write_tar(f: io.BufferedWriter, images: np.ndarray, start: int, paths: list[str], hashes: list[str],
               held: np.ndarray, encoding: str) -> None:
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in np.flatnonzero(held):
            pos = start + int(i)
            key = f"{pos:010d}"  # WebDataset key: no dots; the json, not the key, places the image
            meta = {"path": paths[pos], "hash": hashes[pos], "pixels": _pixels_digest(images[i])}
            _add(tar, f"{key}.{encoding}", _encode(images[i], encoding))
            _add(tar, f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())


def _is_sharded(root: Path) -> bool:
    try:
        return json.loads((root / "pool.json").read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def write_shards(
    pool: Pool, out: str | os.PathLike, shard_size: int = SHARD_SIZE, encoding: str = "npy", progress: bool = True
) -> ShardedPool:
    """Write `pool` as tar shards of `shard_size` manifest rows; the folder appears whole or not at all.

    Reads and holds one shard of images at a time, so any pool size fits in memory.
    """
    if shard_size < 1:
        raise PladaError(f"shard size must be a positive integer, got {shard_size}")
    if encoding not in ENCODINGS:
        raise PladaError(f"unknown shard encoding '{encoding}' (have: {', '.join(ENCODINGS)})")
    out = Path(out)
    if not out.parent.is_dir():
        raise PladaError(f"output folder does not exist: {out.parent}")
    if out.exists() and not (out.is_dir() and (_is_sharded(out) or not any(out.iterdir()))):
        raise PladaError(f"{out} exists and is not a sharded pool folder; refusing to replace it")
    if len(pool) == 0:
        raise PladaError(f"pool '{pool.name}' is empty: nothing to shard")
    n, res = len(pool), int(pool.images.shape[1])
    missing = np.asarray(pool.missing, dtype=bool)
    with building_dir(out) as tmp:
        text = manifest_text(pool.paths, pool.hashes)
        offsets = np.concatenate([[0], np.cumsum([len(p.encode()) + len(h) + 2
                                                  for p, h in zip(pool.paths, pool.hashes, strict=True)])])
        shards: list[Shard] = []
        starts = range(0, n, shard_size)
        for k, a in enumerate(tqdm(starts, desc=f"sharding {pool.name}", unit="shard", disable=not progress)):
            b = min(a + shard_size, n)
            images = np.asarray(pool.images[a:b])  # the only pixels in memory: one shard
            held = ~missing[a:b]
            name = f"pool-{k:06d}.tar"
            atomic_write(tmp / name, lambda f, im=images, a=a, held=held: _write_tar(
                f, im, a, pool.paths, pool.hashes, held, encoding))
            shards.append(Shard(name, a, b, int(held.sum()), int(offsets[a])))
            del images
        atomic_write(tmp / "manifest.tsv", text)
        atomic_save_npy(tmp / "missing.npy", missing)
        write_json_atomic(tmp / "pool.json", {
            "format": FORMAT, "name": pool.name, "size": n, "fingerprint": pool.fingerprint, "resolution": res,
            "missing": int(missing.sum()), "skipped": pool.skipped, "encoding": encoding, "shard_size": shard_size,
            "shards": [asdict(s) for s in shards]})
    return open_sharded(out)


class _NotPlainTar(Exception):
    """A tar feature the fast reader leaves to `tarfile` (long names, pax headers, huge sizes)."""


def _plain_members(f: io.BufferedReader) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a plain USTAR stream, checksums verified.

    `tarfile` costs about as much per member as decoding a small image; shards are written as plain
    USTAR, so reading them is a loop over 512-byte headers. Anything else raises `_NotPlainTar`.
    """
    while True:
        h = f.read(512)
        if h == bytes(512):
            return
        if len(h) < 512:  # our writer always ends with zero blocks: their absence means a cut file
            raise tarfile.ReadError("truncated (no end-of-archive marker)")
        try:
            chk = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlainTar from None
        if chk != sum(h[:148]) + 256 + sum(h[156:]):
            raise tarfile.ReadError("bad header checksum")
        kind = h[156:157]
        if kind not in (b"0", b"\0", b"5"):
            raise _NotPlainTar
        name = h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
            name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
        data = f.read(size)
        if len(data) < size:
            raise tarfile.ReadError("truncated member")
        f.seek(-size % 512, os.SEEK_CUR)
        if kind != b"5":
            yield name, data


def _members(file: Path, fast: bool) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in tar order, by the fast reader or by `tarfile`."""
    if fast:
        with open(file, "rb") as f:
            yield from _plain_members(f)
        return
    with tarfile.open(file, mode="r|") as tar:
        for m in tar:
            if m.isfile():
                yield m.name, tar.extractfile(m).read()


def manifest_slice(manifest: str | os.PathLike, offset: int, count: int) -> tuple[list[str], list[str]]:
    """(paths, hashes) of `count` manifest lines from byte `offset`: what one shard's reader needs."""
    paths, hashes = [], []
    with open(manifest, "rb") as f:
        f.seek(offset)
        for _ in range(count):
            p, _, h = f.readline().decode().rstrip("\n").partition("\t")
            paths.append(p)
            hashes.append(h)
    return paths, hashes


def read_shard(
    file: str | os.PathLike, start: int, paths: list[str], hashes: list[str], res: int, count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images of the manifest range `start .. start+len(paths)` held in one shard, and which rows it holds.

    Each member is placed by its manifest path, whatever order the tar lists it in; rows the shard
    does not hold stay zeros. `count` (the rows the shard should hold) catches lost members.
    """
    file = Path(file)
    n = len(paths)
    where = {p: i for i, p in enumerate(paths)}
    npy_header = _npy_header(res)
    images = np.zeros((n, res, res, 3), dtype=np.uint8)
    held = np.zeros(n, dtype=bool)
    pending: dict[str, dict[str, bytes]] = {}

    def place(key: str, parts: dict[str, bytes]) -> None:
        try:
            meta = json.loads(parts["json"])
            path, digest = meta["path"], meta["pixels"]
        except (ValueError, KeyError, TypeError):
            raise PladaError(f"shard {file.name}: member {key}.json is not a shard record") from None
        i = where.get(path) if isinstance(path, str) else None
        if i is None:
            raise PladaError(f"shard {file.name} holds '{path}', which is not in its manifest range "
                             f"{start}..{start + n}: a shard of another pool, or shard files swapped")
        if meta.get("hash") != hashes[i]:
            raise PladaError(f"shard {file.name}: '{path}' has hash {meta.get('hash')}, the manifest says {hashes[i]}")
        if held[i]:
            raise PladaError(f"shard {file.name} holds '{path}' twice")
        ext = next(e for e in ENCODINGS if e in parts)
        try:
            arr = _decode(parts[ext], ext, res, npy_header)
        except Exception:  # numpy and PIL raise many types on damaged bytes
            raise PladaError(f"shard {file.name}: image of '{path}' is unreadable") from None
        if arr.shape != (res, res, 3) or arr.dtype != np.uint8 or _pixels_digest(arr) != digest:
            raise PladaError(f"shard {file.name}: image of '{path}' is damaged (its pixels do not match its record)")
        images[i] = arr
        held[i] = True

    def consume(fast: bool) -> None:
        for name, raw in _members(file, fast):  # one sequential pass: how shards are streamed
            key, _, ext = name.rsplit("/", 1)[-1].partition(".")
            if ext in ("json", *ENCODINGS):
                parts = pending.setdefault(key, {})
                parts[ext] = raw
                if "json" in parts and any(e in parts for e in ENCODINGS):
                    place(key, pending.pop(key))

    try:
        try:
            consume(fast=True)
        except _NotPlainTar:  # a shard written by another tool: start again with tarfile
            images[:], held[:] = 0, False
            pending.clear()
            consume(fast=False)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PladaError(f"cannot read shard {file}: {e}") from None
    if pending:
        key = next(iter(pending))
        raise PladaError(f"shard {file.name}: member {key} lacks its "
                         f"{'image' if 'json' in pending[key] else 'json record'}")
    if count is not None and int(held.sum()) != count:
        raise PladaError(f"shard {file.name} holds {int(held.sum())} images, its pool says {count}")
    return images, held


class ShardImages:
    """The pool's images as an array-like over its shards: slicing reads only the shards it touches.

    This is what lets a sharded pool stand in for `Pool.images` everywhere (local scoring, features,
    a receiver gathering its kept images) with one decoded shard in memory at a time.
    """

    def __init__(self, pool: ShardedPool) -> None:
        self._pool = pool
        self._starts = np.array([s.start for s in pool.shards], dtype=np.int64)
        self._cached: tuple[int, np.ndarray] | None = None
        self.shape = (len(pool), pool.resolution, pool.resolution, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    def __len__(self) -> int:
        return self.shape[0]

    def _shard(self, k: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != k:
            self._cached = None  # drop the old shard before decoding the next: one in memory
            self._cached = (k, self._pool.read(k)[0])
        return self._cached[1]

    def __getitem__(self, key: int | slice | np.ndarray | list[int]) -> np.ndarray:
        n = len(self)
        if isinstance(key, int | np.integer):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} images")
            return self[np.array([i])][0]
        if isinstance(key, slice):
            pos = np.arange(*key.indices(n), dtype=np.int64)
        else:
            pos = np.asarray(key)
            pos = np.flatnonzero(pos) if pos.dtype == bool else pos.astype(np.int64).ravel()
            pos = np.where(pos < 0, pos + n, pos)
            if len(pos) and (pos.min() < 0 or pos.max() >= n):
                raise IndexError(f"index out of range for {n} images")
        out = np.empty((len(pos), *self.shape[1:]), dtype=np.uint8)
        k_of = np.searchsorted(self._starts, pos, side="right") - 1
        order = np.argsort(k_of, kind="stable")
        bounds = np.flatnonzero(np.diff(k_of[order])) + 1
        for group in np.split(order, bounds) if len(order) else []:
            k = int(k_of[group[0]])
            out[group] = self._shard(k)[pos[group] - self._starts[k]]
        return out

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        arr = self[:]  # the whole pool in memory: only for small pools
        return arr if dtype is None else arr.astype(dtype)


@dataclass
class ShardedPool(Pool):
    """A `Pool` whose images live in tar shards (see the module docstring)."""

    shards: list[Shard] = field(default_factory=list)
    resolution: int = 0
    encoding: str = "npy"
    shard_size: int = SHARD_SIZE

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(images, held) of shard `k`'s manifest range."""
        s = self.shards[k]
        return read_shard(self.root / s.file, s.start, self.paths[s.start : s.stop], self.hashes[s.start : s.stop],
                          self.resolution, s.count)

    def iter_shards(self, order: Iterable[int] | None = None) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(start, images, held) per shard, one shard in memory at a time, in `order` (default: file order)."""
        for k in range(len(self.shards)) if order is None else order:
            images, held = self.read(int(k))
            yield self.shards[int(k)].start, images, held


def open_sharded(root: str | os.PathLike) -> ShardedPool:
    """A sharded pool folder, checked: manifest against fingerprint, shard ranges against the manifest."""
    root = Path(root)
    try:
        meta = json.loads((root / "pool.json").read_bytes())
    except FileNotFoundError:
        raise PladaError(f"no sharded pool at {root} (write one with `plada pool shard`)") from None
    except (OSError, ValueError) as e:
        raise PladaError(f"sharded pool {root} is damaged: pool.json unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PladaError(f"{root} is not a sharded pool folder (write one with `plada pool shard`)")
    try:
        paths, hashes, text = read_manifest(root / "manifest.tsv")
    except PladaError as e:
        raise PladaError(f"sharded pool {root} is damaged: {e}") from None
    fp = hashlib.sha256(text).hexdigest()
    if fp != meta.get("fingerprint"):
        raise PladaError(f"sharded pool {root} is damaged: its manifest does not match its recorded fingerprint")
    try:
        shards = [Shard(**s) for s in meta["shards"]]
        res, size = int(meta["resolution"]), int(meta["shard_size"])
    except (KeyError, TypeError, ValueError):
        raise PladaError(f"sharded pool {root} is damaged: pool.json lacks its shard table") from None
    edge = 0
    for k, s in enumerate(shards):  # uniform shards: a shard is exactly one scoring chunk, whichever engine
        rows = s.stop - s.start
        if s.start != edge or not 0 < rows <= size or (rows < size and k < len(shards) - 1) \
                or not 0 <= s.count <= rows:
            raise PladaError(f"sharded pool {root} is damaged: shard {s.file} is not manifest rows "
                             f"{edge}..{min(edge + size, len(paths))}")
        if not (root / s.file).is_file():
            raise PladaError(f"sharded pool {root} lacks shard {s.file}")
        edge = s.stop
    if edge != len(paths):
        raise PladaError(f"sharded pool {root} is damaged: its shards cover {edge} of {len(paths)} manifest rows")
    missing = np.load(root / "missing.npy") if (root / "missing.npy").is_file() else None
    if missing is not None and missing.shape != (len(paths),):
        raise PladaError(f"sharded pool {root} is damaged: its missing mask does not match its manifest")
    pool = ShardedPool(str(meta.get("name", root.name)), root, None, paths, hashes, fp, missing,  # type: ignore[arg-type]
                       int(meta.get("skipped", 0)), shards=shards, resolution=res,
                       encoding=str(meta.get("encoding", "npy")), shard_size=size)
    pool.images = ShardImages(pool)  # type: ignore[assignment]
    return pool


def open_any(
    spec: str | os.PathLike, data: str | os.PathLike | None = None, build: bool = True, progress: bool = True
) -> Pool:
    """A pool by folder or name, sharded or not: every command that takes `--pool` accepts both."""
    for root in (Path(spec), pools_dir() / str(spec)):
        if _is_sharded(root):
            return open_sharded(root)
    return open_pool(spec, data, build=build, progress=progress)
