"""The reference pool: a fixed order of unlabeled images that sender and receiver both hold.

A payload is only a list of pool positions plus labels, so both sides must agree on the pool's
order and contents to the byte; a shifted order would silently mislabel everything. The manifest
fixes the order as the sorted relative paths (`source/split/class/file`) across the pool's
sources, records a content hash of every image file, and the pool fingerprint is the SHA-256 of
the manifest text. Every payload carries that fingerprint and the receiver refuses a mismatch.
Folder names inside the pool are kept only as groups (for payload coding); its labels are never
used by the method.

A receiver whose copy of the pool is incomplete (lost files, bit rot) builds it from the sender's
published manifest instead: the pool then has the canonical order and fingerprint, and its
per-image hashes mark which rows it really holds (`missing`), so a payload can be checked image by
image rather than refused as a whole.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import atomic_save_npy, atomic_write, building_dir, cache_root, load_source, write_json_atomic
from .errors import PladaError, PoolMismatchError, reading
from .manifest import Manifest, manifest_text

__all__ = ["DEFAULT_POOL", "Manifest", "Pool", "build_pool", "export_manifest", "fingerprint_of", "manifest_text",
           "open_pool", "parse_spec", "pools_dir", "read_manifest"]

DEFAULT_POOL = "tinyimagenet32"


@dataclass
class Pool:
    """Pool images (memory-mapped, manifest order) with their manifest and fingerprint."""

    name: str
    root: Path
    images: np.ndarray  # (N, R, R, 3) uint8
    paths: Sequence[str]  # list, or a view over the manifest's bytes (plada.manifest)
    hashes: Sequence[str]
    fingerprint: str
    missing: np.ndarray | None = None  # (N,) bool: rows this copy lacks (stored as zeros); None: complete
    skipped: int = 0  # unreadable source files left out when the pool was built
    _groups: tuple[np.ndarray, list[str]] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.missing is None:
            self.missing = np.zeros(len(self.paths), dtype=bool)

    def __len__(self) -> int:
        return len(self.paths)

    def groups(self) -> tuple[np.ndarray, list[str]]:
        """Group id per image (its folder) and the group names: the pool's only structure we use."""
        if self._groups is None:
            # A dict rather than np.unique over an array of folder strings: at 14M paths that array
            # alone would be ~2 GB of fixed-width unicode. Ids follow the sorted folder names.
            first_seen: dict[str, int] = {}
            raw = np.fromiter((first_seen.setdefault(p.rsplit("/", 1)[0], len(first_seen)) for p in self.paths),
                              dtype=np.int64, count=len(self.paths))
            names = sorted(first_seen)
            rank = np.empty(len(names), dtype=np.int64)
            rank[[first_seen[n] for n in names]] = np.arange(len(names))
            self._groups = (rank[raw], names)
        return self._groups

    def check(self, fingerprint: str) -> None:
        """Refuse a payload made for another pool: a wrong pool would silently mislabel everything."""
        if fingerprint != self.fingerprint:
            raise PoolMismatchError(
                f"payload was made for pool {fingerprint[:16]}…, but pool '{self.name}' is "
                f"{self.fingerprint[:16]}…: sender and receiver must hold the same pool "
                "(get the sender's `plada pool export` manifest and `plada pool build SOURCES --manifest` it)"
            )


def fingerprint_of(paths: Sequence[str], hashes: Sequence[str]) -> str:
    return hashlib.sha256(manifest_text(paths, hashes)).hexdigest()


def read_manifest(path: str | os.PathLike) -> tuple[Sequence[str], Sequence[str], bytes]:
    """(paths, hashes, raw bytes) of a published manifest, refusing anything not byte-canonical.

    The columns are views over the raw bytes (`plada.manifest`): a 14M-line manifest is held as one
    buffer, not as 28M strings.
    """
    path = Path(path)
    with reading(path, "manifest"):
        raw = path.read_bytes()
    m = Manifest.parse(raw, path)
    return m.paths, m.hashes, raw


def parse_spec(spec: str) -> tuple[str, list[str] | None]:
    """`NAME` (all splits) or `NAME:split1,split2`."""
    name, _, splits = spec.partition(":")
    return name, ([s for s in splits.split(",") if s] or None) if splits else None


def pools_dir() -> Path:
    return cache_root() / "pools"


def build_pool(
    sources: list[str],
    data: str | os.PathLike | None = None,
    name: str | None = None,
    out: Path | None = None,
    manifest: str | os.PathLike | None = None,
    progress: bool = True,
) -> Pool:
    """Join sources (each `NAME` or `NAME:split,...`) into one pool with a manifest and fingerprint.

    With `manifest`, the pool takes that manifest's order and fingerprint; rows the sources lack,
    or hold with other bytes, become zeros flagged in `missing`.
    """
    if not sources:
        raise PladaError("a pool needs at least one source")
    canon = read_manifest(manifest) if manifest is not None else None  # cheap mistakes first
    name = name or "+".join(Path(parse_spec(s)[0]).name.split(".tar")[0].split(".tgz")[0] for s in sources)
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        raise PladaError(f"pool name must be a plain folder name, got {name!r}")
    root = out or pools_dir() / name
    if root.exists() and not (root / "pool.json").is_file():
        raise PladaError(f"{root} exists and is not a pool folder; refusing to replace it")
    rows: list[tuple[str, str, int, int]] = []  # path, hash, source idx, row in source
    loaded = []
    skipped = 0
    for si, spec in enumerate(sources):
        src_name, splits = parse_spec(spec)
        src = load_source(src_name, data, progress=progress)
        if splits is not None:
            absent = sorted(set(splits) - set(src.splits()))
            if absent:
                raise PladaError(f"source '{src.name}' has no split {absent} (has: {', '.join(src.splits())})")
        loaded.append(src)
        skipped += sum(splits is None or p.split("/", 1)[0] in splits for p in src.skipped)
        for i, (p, h) in enumerate(zip(src.paths, src.hashes, strict=True)):
            if splits is None or p.split("/", 1)[0] in splits:
                rows.append((f"{src.name}/{p}", h, si, i))
    res = {s.resolution for s in loaded}
    if len(res) != 1:
        raise PladaError(f"pool sources have different resolutions {sorted(res)}; build one pool per resolution")
    rows.sort(key=lambda r: r[0])
    if any(rows[i][0] == rows[i + 1][0] for i in range(len(rows) - 1)):  # sorted: a repeat is a neighbour
        raise PladaError("pool sources overlap: the same relative path appears twice")
    if canon is None:
        paths, hashes = [r[0] for r in rows], [r[1] for r in rows]
        text = manifest_text(paths, hashes)
    else:
        paths, hashes, text = canon
        have = {r[0]: r for r in rows}
        rows = [have[p] if p in have and have[p][1] == h else (p, h, -1, -1)
                for p, h in zip(paths, hashes, strict=True)]
        if all(r[2] < 0 for r in rows):
            raise PladaError(
                f"the sources hold none of the manifest's {len(paths)} images (check source names: "
                f"manifest paths look like '{paths[0]}', the sources give e.g. '{next(iter(have), 'nothing')}')"
            )
    fp = hashlib.sha256(text).hexdigest()
    src_idx = np.fromiter((x[2] for x in rows), dtype=np.int64, count=len(rows))
    row_idx = np.fromiter((x[3] for x in rows), dtype=np.int64, count=len(rows))
    missing = src_idx < 0
    with building_dir(root) as tmp:
        r = res.pop()
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(rows), r, r, 3))  # zeros: missing rows stay black
        for si, src in enumerate(loaded):
            dest = np.flatnonzero(src_idx == si)
            for a in tqdm(range(0, len(dest), 16384), desc=f"pool {name}: copying {src.name}", unit="chunk",
                          disable=not progress):
                d = dest[a : a + 16384]
                images[d] = src.images[row_idx[d]]
        images.flush()
        del images
        atomic_write(tmp / "manifest.tsv", text)
        atomic_save_npy(tmp / "missing.npy", missing)
        write_json_atomic(tmp / "pool.json", {"name": name, "sources": sources, "size": len(paths),
                                              "fingerprint": fp, "resolution": r, "missing": int(missing.sum()),
                                              "skipped": skipped})
    return open_pool(root)


def open_pool(
    spec: str | os.PathLike, data: str | os.PathLike | None = None, build: bool = True, progress: bool = True
) -> Pool:
    """A built pool by folder or name; a dataset name not yet built is built from all its splits."""
    root = Path(spec)
    if not (root / "pool.json").is_file():
        root = pools_dir() / str(spec)
    if not (root / "pool.json").is_file():
        if os.sep in str(spec) or not build:
            raise PladaError(f"no pool '{spec}' (build one with `plada pool build`)")
        return build_pool([str(spec)], data, name=str(spec), progress=progress)
    meta = json.loads((root / "pool.json").read_bytes())
    try:
        paths, hashes, text = read_manifest(root / "manifest.tsv")
    except PladaError as e:
        raise PladaError(f"pool {root} is damaged: {e}") from None
    fp = hashlib.sha256(text).hexdigest()
    if fp != meta["fingerprint"]:
        raise PladaError(f"pool {root} is damaged: its manifest does not match its recorded fingerprint")
    images = np.load(root / "images.npy", mmap_mode="r")
    if len(images) != len(paths):
        raise PladaError(f"pool {root} is damaged: {len(images)} images for {len(paths)} manifest rows")
    missing = np.load(root / "missing.npy") if (root / "missing.npy").is_file() else None  # older pools: complete
    if missing is not None and missing.shape != (len(paths),):
        raise PladaError(f"pool {root} is damaged: its missing mask does not match its manifest")
    return Pool(meta["name"], root, images, paths, hashes, fp, missing, int(meta.get("skipped", 0)))


def export_manifest(pool: Pool, out: str | os.PathLike) -> Path:
    """Publish the manifest so a receiver can build the same pool, or find what its copy lacks."""
    out = Path(out)
    if not out.parent.is_dir():
        raise PladaError(f"output folder does not exist: {out.parent}")
    if out.is_dir():
        raise PladaError(f"output path is a directory: {out}")
    atomic_write(out, (pool.root / "manifest.tsv").read_bytes())
    return out
