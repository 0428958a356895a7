"""The reference pool: a fixed order of unlabeled images that sender and receiver both hold.

A payload is only a list of pool positions plus labels, so both sides must agree on the pool's
order and contents to the byte; a shifted order would silently mislabel everything. The manifest
fixes the order as the sorted relative paths (`source/split/class/file`) across the pool's
sources, records a content hash of every image file, and the pool fingerprint is the SHA-256 of
the manifest text. Every payload carries that fingerprint and the receiver refuses a mismatch.
Folder names inside the pool are kept only as groups (for payload coding); its labels are never
used by the method.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import cache_root, load_source, write_json_atomic
from .errors import PladaError, PoolMismatchError

DEFAULT_POOL = "tinyimagenet32"


@dataclass
class Pool:
    """Pool images (memory-mapped, manifest order) with their manifest and fingerprint."""

    name: str
    root: Path
    images: np.ndarray  # (N, R, R, 3) uint8
    paths: list[str]
    hashes: list[str]
    fingerprint: str

    def __len__(self) -> int:
        return len(self.paths)

    def groups(self) -> tuple[np.ndarray, list[str]]:
        """Group id per image (its folder) and the group names: the pool's only structure we use."""
        folders = [p.rsplit("/", 1)[0] for p in self.paths]
        names = sorted(set(folders))
        lut = {f: i for i, f in enumerate(names)}
        return np.fromiter((lut[f] for f in folders), dtype=np.int64, count=len(folders)), names

    def check(self, fingerprint: str) -> None:
        """Refuse a payload made for another pool: a wrong pool would silently mislabel everything."""
        if fingerprint != self.fingerprint:
            raise PoolMismatchError(
                f"payload was made for pool {fingerprint[:16]}…, but pool '{self.name}' is "
                f"{self.fingerprint[:16]}…: sender and receiver must hold the same pool"
            )


def manifest_text(paths: list[str], hashes: list[str]) -> bytes:
    """The canonical manifest: one `path<TAB>hash` line per image, in pool order."""
    return "".join(f"{p}\t{h}\n" for p, h in zip(paths, hashes, strict=True)).encode()


def fingerprint_of(paths: list[str], hashes: list[str]) -> str:
    return hashlib.sha256(manifest_text(paths, hashes)).hexdigest()


def parse_spec(spec: str) -> tuple[str, list[str] | None]:
    """`NAME` (all splits) or `NAME:split1,split2`."""
    name, _, splits = spec.partition(":")
    return name, ([s for s in splits.split(",") if s] or None) if splits else None


def pools_dir() -> Path:
    return cache_root() / "pools"


def build_pool(
    sources: list[str], data: str | os.PathLike | None = None, name: str | None = None, out: Path | None = None
) -> Pool:
    """Join sources (each `NAME` or `NAME:split,...`) into one pool with a manifest and fingerprint."""
    if not sources:
        raise PladaError("a pool needs at least one source")
    rows: list[tuple[str, str, int, int]] = []  # path, hash, source idx, row in source
    loaded = []
    for si, spec in enumerate(sources):
        src_name, splits = parse_spec(spec)
        src = load_source(src_name, data)
        if splits is not None:
            missing = sorted(set(splits) - set(src.splits()))
            if missing:
                raise PladaError(f"source '{src.name}' has no split {missing} (has: {', '.join(src.splits())})")
        loaded.append(src)
        for i, (p, h) in enumerate(zip(src.paths, src.hashes, strict=True)):
            if splits is None or p.split("/", 1)[0] in splits:
                rows.append((f"{src.name}/{p}", h, si, i))
    res = {s.resolution for s in loaded}
    if len(res) != 1:
        raise PladaError(f"pool sources have different resolutions {sorted(res)}; build one pool per resolution")
    rows.sort(key=lambda r: r[0])
    paths = [r[0] for r in rows]
    if len(set(paths)) != len(paths):
        raise PladaError("pool sources overlap: the same relative path appears twice")
    hashes = [r[1] for r in rows]
    fp = fingerprint_of(paths, hashes)
    name = name or "+".join(parse_spec(s)[0] for s in sources)
    root = out or pools_dir() / name
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    r = res.pop()
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(rows), r, r, 3))
    src_idx = np.fromiter((x[2] for x in rows), dtype=np.int64, count=len(rows))
    row_idx = np.fromiter((x[3] for x in rows), dtype=np.int64, count=len(rows))
    for si, src in enumerate(loaded):
        dest = np.flatnonzero(src_idx == si)
        for a in tqdm(range(0, len(dest), 16384), desc=f"pool {name}: copying {src.name}", unit="chunk"):
            d = dest[a : a + 16384]
            images[d] = src.images[row_idx[d]]
    images.flush()
    del images
    (tmp / "manifest.tsv").write_bytes(manifest_text(paths, hashes))
    write_json_atomic(
        tmp / "pool.json", {"name": name, "sources": sources, "size": len(paths), "fingerprint": fp, "resolution": r}
    )
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return open_pool(root)


def open_pool(spec: str | os.PathLike, data: str | os.PathLike | None = None) -> Pool:
    """A built pool by folder or name; a dataset name not yet built is built from all its splits."""
    root = Path(spec)
    if not (root / "pool.json").is_file():
        root = pools_dir() / str(spec)
    if not (root / "pool.json").is_file():
        if os.sep in str(spec):
            raise PladaError(f"no pool at {spec} (build one with `plada pool build`)")
        return build_pool([str(spec)], data, name=str(spec))
    import json

    meta = json.loads((root / "pool.json").read_text())
    text = (root / "manifest.tsv").read_text()
    lines = text.splitlines()
    paths = [ln.split("\t", 1)[0] for ln in lines]
    hashes = [ln.split("\t", 1)[1] for ln in lines]
    fp = hashlib.sha256(text.encode()).hexdigest()
    if fp != meta["fingerprint"]:
        raise PladaError(f"pool {root} is damaged: its manifest does not match its recorded fingerprint")
    images = np.load(root / "images.npy", mmap_mode="r")
    if len(images) != len(paths):
        raise PladaError(f"pool {root} is damaged: {len(images)} images for {len(paths)} manifest rows")
    return Pool(meta["name"], root, images, paths, hashes, fp)
