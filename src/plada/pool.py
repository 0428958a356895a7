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

Pools as users hold them (a folder of JPEGs, WebDataset shards) are not decoded at all: their manifest
paths are the files' paths under the folder (or the samples' original names), and `Pool.images` decodes
the files on access at the resolution the model asks for (`Pool.images_at`, `plada.images`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import DEFAULT_POOL
from .data import atomic_save_npy, atomic_write, cache_root, load_source, resolve_source, write_json_atomic
from .errors import PladaError, PoolMismatchError, reading
from .images import (
    DEFAULT_RES,
    MAX_PIXELS,
    FolderFiles,
    LazyImages,
    TarMembers,
    at_size,
    layout_of,
    scan_folder,
    scan_shards,
)
from .manifest import Manifest, folder_groups, manifest_text, unstorable_paths

try:
    import fcntl
except ImportError:  # Windows: no flock; concurrent builds of one pool are then the user's to avoid
    fcntl = None  # type: ignore[assignment]

__all__ = ["DEFAULT_POOL", "Manifest", "Pool", "build_pool", "export_manifest", "fingerprint_of", "manifest_text",
           "open_pool", "parse_spec", "pools_dir", "read_manifest"]


# A pool folder holds complete versions `v-<hex>/` and a symlink `current` naming one of them; replacing
# that symlink (os.replace) is the one atomic step of a rebuild, so at every instant the folder opens as
# the old pool or the new one. The top-level files are fixed symlinks through `current`, so paths like
# `pools/NAME/images.npy` keep working; folders built before versions existed hold the files themselves.
_CURRENT = "current"
_FILES = ("images.npy", "missing.npy", "manifest.tsv", "pool.json")  # pool.json marks a pool folder
_FILES_LAZY = ("missing.npy", "manifest.tsv", "pool.json")  # a folder or shard pool: no decoded images
_KIND_FILES = "files"  # pool.json "kind" of a pool read from the user's own image files or shards
_LOCK = ".lock"
_VERSION = re.compile(r"v-[0-9a-f]{16}")
_TEMP = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")


@dataclass
class Pool:
    """Pool images (memory-mapped, manifest order) with their manifest and fingerprint."""

    name: str
    root: Path
    images: np.ndarray  # (N, R, R, 3) uint8; a folder or shard pool's is a `LazyImages` at images.DEFAULT_RES
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

    def images_at(self, res: int) -> np.ndarray:
        """The images as a model of input size `res` reads them.

        Why: a folder or shard pool has no resolution of its own and decodes each file straight to `res`
        (one resize, from the full-resolution file); a decoded pool has one resolution, and `train.prepare`
        resizes its rows, so it is returned unchanged and its results stay byte-identical.
        """
        return at_size(self.images, res)

    def groups(self) -> tuple[np.ndarray, list[str]]:
        """Group id per image (its folder) and the group names: the pool's only structure we use."""
        if self._groups is None:  # in numpy when `paths` is a manifest's column, a path at a time for a list
            self._groups = folder_groups(self.paths)
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


def _storable_manifest(paths: list[str], hashes: list[str]) -> bytes:
    """The manifest of these rows, refusing up front (with the files' names) paths no manifest can hold.

    Cheap when all is well: counting separators in the joined bytes finds a stray one without a pass in Python.
    """
    if not paths:
        raise PladaError("the pool sources hold no images")
    try:
        text = manifest_text(paths, hashes)
        ok = (text.count(b"\n") == len(paths) and text.count(b"\t") == len(paths)
              and b"\r" not in text and b"\x00" not in text)
    except UnicodeEncodeError:
        ok = False
    bad = [] if ok else unstorable_paths(paths)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise PladaError(
            f"{len(bad)} image file name(s) cannot be stored in a pool manifest (a newline, tab, carriage "
            f"return or NUL, or not UTF-8): {', '.join(ascii(p) for p in bad[:5])}{more}; rename them or "
            "remove them from the source"
        )
    Manifest.parse(text)  # what `open_pool` will check, before any pool is touched
    return text


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
    or hold with other bytes, become zeros flagged in `missing`. One folder of image files (ImageNet's
    `train/<wnid>/<file>.JPEG`) or of WebDataset `.tar` shards is a pool by itself: only its manifest is
    written, and its images are decoded from the files when read (`plada.images`).
    """
    if not sources:
        raise PladaError("a pool needs at least one source")
    canon = read_manifest(manifest) if manifest is not None else None  # cheap mistakes first
    name = name or "+".join(Path(parse_spec(s)[0]).name.split(".tar")[0].split(".tgz")[0] for s in sources)
    if name in ("", ".", "..") or "/" in name or os.sep in name:
        raise PladaError(f"pool name must be a plain folder name, got {name!r}")
    root = Path(out) if out is not None else pools_dir() / name
    _check_replaceable(root)
    files = _files_source(sources, data)
    if files is not None:
        return _build_files_pool(files[0], files[1], name, root, canon, progress)
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
        text = _storable_manifest(paths, hashes)
    else:
        paths, hashes, text = canon
        have = {r[0]: r for r in rows}
        rows = [have[p] if p in have and have[p][1] == h else (p, h, -1, -1)
                for p, h in zip(paths, hashes, strict=True)]
        if all(r[2] < 0 for r in rows):
            raise PladaError(
                f"the sources hold none of the manifest's {len(paths)} images (check source names: "
                f"manifest paths look like {paths[0]!r}, the sources give e.g. {next(iter(have), 'nothing')!r})"
            )
    fp = hashlib.sha256(text).hexdigest()
    src_idx = np.fromiter((x[2] for x in rows), dtype=np.int64, count=len(rows))
    row_idx = np.fromiter((x[3] for x in rows), dtype=np.int64, count=len(rows))
    missing = src_idx < 0
    r = res.pop()
    with _locked(root, name, progress) as created:
        _check_replaceable(root)  # again: another build may have run while we waited
        version = root / f"v-{secrets.token_hex(8)}"
        try:
            version.mkdir()
            images = np.lib.format.open_memmap(version / "images.npy", mode="w+", dtype=np.uint8,
                                               shape=(len(rows), r, r, 3))  # zeros: missing rows stay black
            for si, src in enumerate(loaded):
                dest = np.flatnonzero(src_idx == si)
                for a in tqdm(range(0, len(dest), 16384), desc=f"pool {name}: copying {src.name}", unit="chunk",
                              disable=not progress):
                    d = dest[a : a + 16384]
                    images[d] = src.images[row_idx[d]]
            images.flush()
            del images
            _fsync(version / "images.npy")
            atomic_write(version / "manifest.tsv", text)
            atomic_save_npy(version / "missing.npy", missing)
            write_json_atomic(version / "pool.json", {"name": name, "sources": sources, "size": len(paths),
                                                      "fingerprint": fp, "resolution": r,
                                                      "missing": int(missing.sum()), "skipped": skipped})
            _fsync(version)
            pool = _open_version(version, root)  # read the new pool back before it replaces anything
            _swap(root, version.name)
        except BaseException:
            if not _published(root, version):  # nobody else will ever read it
                shutil.rmtree(version, ignore_errors=True)
                if created:  # leave no empty folder where there was none
                    _remove_if_only_lock(root)
            raise
        _clean(root, keep=version.name)
    return pool


def _files_source(sources: list[str], data: str | os.PathLike | None) -> tuple[Path, str] | None:
    """(folder, layout) when the sources name a folder of image files or of WebDataset shards, else None.

    Such a folder is a pool by itself (nothing decoded, nothing copied), so it must be the only source and
    taken whole: joined with others or split by `:split`, its manifest would no longer be its own.
    """
    found = []
    for spec in sources:
        src_name, splits = parse_spec(spec)
        try:
            path = resolve_source(src_name, data)
        except PladaError:
            continue  # the decoded path below names what is wrong with it
        layout = layout_of(path)
        if layout is not None:
            found.append((path, layout, splits))
    if not found:
        return None
    path, layout, splits = found[0]
    if len(sources) > 1 or splits is not None:
        raise PladaError(f"{path} is a {'folder of images' if layout == 'folder' else 'folder of tar shards'}: it is "
                         "a pool on its own, built alone and whole (no other sources, no :split)")
    return path, layout


def _build_files_pool(src: Path, layout: str, name: str, root: Path,
                      canon: tuple[Sequence[str], Sequence[str], bytes] | None, progress: bool) -> Pool:
    """A pool read from the user's own files: its manifest, missing mask and shard index, no pixels.

    Hashing reads every file once (in parallel); decoding waits until a model asks for a resolution.
    """
    src = src.resolve()
    got = scan_folder(src, progress) if layout == "folder" else scan_shards(src, progress)
    members = got.members
    if canon is None:
        text = _storable_manifest(got.paths, got.hashes)
        paths = got.paths
        missing = np.zeros(len(paths), dtype=bool)
    else:
        paths, hashes, text = canon
        have = {p: i for i, p in enumerate(got.paths)}
        at = np.fromiter((have.get(p, -1) for p in paths), dtype=np.int64, count=len(paths))
        same = np.fromiter((i >= 0 and got.hashes[i] == h for i, h in zip(at.tolist(), hashes, strict=True)),
                           dtype=bool, count=len(paths))
        if not same.any():
            raise PladaError(
                f"{src} holds none of the manifest's {len(paths)} images (manifest paths look like {paths[0]!r}, "
                f"{src.name} gives e.g. {got.paths[0]!r})")
        missing = ~same
        if members is not None:
            members = np.where(same[:, None], members[np.maximum(at, 0)], np.array([-1, 0, 0]))
    fp = hashlib.sha256(text).hexdigest()
    n, n_skipped, shards = len(paths), len(got.skipped), got.shards
    with _locked(root, name, progress) as created:
        _check_replaceable(root)
        version = root / f"v-{secrets.token_hex(8)}"
        try:
            version.mkdir()
            atomic_write(version / "manifest.tsv", text)
            # the pool opened below reads its manifest back from disk: the scan's copy goes first, so a
            # build holds one manifest at a time, not two (1.2 GB each at 14.2M images)
            got = text = paths = hashes = None  # type: ignore[assignment]
            atomic_save_npy(version / "missing.npy", missing)
            if members is not None:
                atomic_save_npy(version / "members.npy", np.ascontiguousarray(members, dtype=np.int64))
            meta = {"name": name, "kind": _KIND_FILES, "layout": layout, "source": str(src), "sources": [str(src)],
                    "size": n, "fingerprint": fp, "missing": int(missing.sum()), "skipped": n_skipped,
                    "default_res": DEFAULT_RES, "max_pixels": MAX_PIXELS}
            if shards is not None:
                meta["shards"] = shards
            write_json_atomic(version / "pool.json", meta)
            _fsync(version)
            pool = _open_version(version, root)
            _swap(root, version.name, _FILES_LAZY)
        except BaseException:
            if not _published(root, version):
                shutil.rmtree(version, ignore_errors=True)
                if created:
                    _remove_if_only_lock(root)
            raise
        stale = root / "images.npy"  # the decoded pool this replaced linked its images there: nothing now
        if stale.is_symlink() and not stale.exists():
            stale.unlink(missing_ok=True)
        _clean(root, keep=version.name)
    return pool


def _open_files(folder: Path, root: Path, meta: dict, paths: Sequence[str], hashes: Sequence[str],
                fp: str) -> Pool:
    """A folder or shard pool: its images a `LazyImages` over the files it was built from, checked present."""
    rebuild = "rebuild it with `plada pool build FOLDER`"
    src = Path(str(meta.get("source", "")))
    layout = meta.get("layout")
    if layout not in ("folder", "shards") or not src.is_absolute():
        raise PladaError(f"pool {root} is damaged: pool.json lacks where its images are; {rebuild}")
    if not src.is_dir():
        raise PladaError(f"pool '{meta['name']}' reads its images from {src}, which is not there (moved or "
                         f"unmounted?); {rebuild}")
    try:
        missing = np.load(folder / "missing.npy")
        members = np.load(folder / "members.npy", mmap_mode="r") if layout == "shards" else None
    except (OSError, ValueError, EOFError):
        raise PladaError(f"pool {root} is damaged: its missing mask or shard index cannot be read; {rebuild}") from None
    if missing.shape != (len(paths),) or missing.dtype != bool:
        raise PladaError(f"pool {root} is damaged: its missing mask does not match its manifest")
    if layout == "folder":
        source: FolderFiles | TarMembers = FolderFiles(src, paths)
    else:
        shards = meta.get("shards")
        if (members is None or members.shape != (len(paths), 3) or members.dtype != np.int64
                or not isinstance(shards, list) or not all(isinstance(f, str) and "/" not in f for f in shards)):
            raise PladaError(f"pool {root} is damaged: its shard index does not match its manifest; {rebuild}")
        gone = [f for f in shards if not (src / f).is_file()]
        if gone:
            raise PladaError(f"pool '{meta['name']}' lacks shard {src / gone[0]}" +
                             (f" and {len(gone) - 1} more" if len(gone) > 1 else "") + f"; {rebuild}")
        source = TarMembers([src / f for f in shards], members, paths)
    max_pixels = meta.get("max_pixels", MAX_PIXELS)
    images = LazyImages(source, DEFAULT_RES, hashes=hashes, missing=missing if missing.any() else None,
                        label=f"pool '{meta['name']}'", max_pixels=max_pixels if isinstance(max_pixels, int) else
                        MAX_PIXELS)
    return Pool(meta["name"], root, images, paths, hashes, fp, missing,  # type: ignore[arg-type]
                int(meta.get("skipped", 0)))


def _fsync(path: Path) -> None:
    """Make a file's or folder's contents durable before a rename publishes them (a power cut, not only a kill)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_pool_entry(name: str) -> bool:
    return name in _FILES or name in (_CURRENT, _LOCK) or bool(_VERSION.fullmatch(name) or _TEMP.fullmatch(name))


def _check_replaceable(root: Path) -> None:
    """Refuse to build over anything but a pool (of either layout), an empty folder, or a pool's leftovers.

    Leftovers: a folder holding only pool files (say an older plada killed while deleting it) is ours to
    replace; a folder with anything else in it may be the user's, and is left alone.
    """
    if not root.exists() and not root.is_symlink():
        return
    if not root.is_dir():
        raise PladaError(f"{root} exists and is not a pool folder; refusing to replace it")
    if (root / "pool.json").is_file():
        try:
            sharded = "format" in json.loads((root / "pool.json").read_bytes())
        except (OSError, ValueError, TypeError):
            sharded = False
        if sharded:
            raise PladaError(f"{root} is a sharded pool folder; refusing to replace it (pick another --out)")
        return
    if not all(_is_pool_entry(e) for e in os.listdir(root)):
        raise PladaError(f"{root} exists and is not a pool folder; refusing to replace it")


@contextmanager
def _locked(root: Path, name: str, progress: bool) -> Iterator[bool]:
    """Hold `root/.lock` (creating `root`), so builds of one pool take turns; yields whether `root` was made here.

    The lock file is checked to still be the one at its path once held: a build that failed in a folder
    it had made removes the folder, and a waiter must not then build in the deleted one.
    """
    while True:
        try:
            root.mkdir(parents=True)
            created = True
        except FileExistsError:
            created = False
        try:
            fd = os.open(root / _LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:  # removed between mkdir and open by a failing build: go again
            continue
        except OSError as e:
            raise PladaError(f"cannot lock pool folder {root}: {e.strerror or e}") from None
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if progress:
                        print(f"plada: waiting for another build of pool '{name}' to finish", file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(root / _LOCK))
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield created
    finally:
        os.close(fd)  # releases the lock


def _remove_if_only_lock(root: Path) -> None:
    try:
        if os.listdir(root) == [_LOCK]:
            os.unlink(root / _LOCK)
            os.rmdir(root)
    except OSError:
        pass


def _link(root: Path, name: str, target: str) -> None:
    """Point `root/name` at `target` in one step: a new symlink renamed over the old entry."""
    tmp = root / f".{name}.{secrets.token_hex(8)}.tmp"
    os.symlink(target, tmp)
    try:
        os.replace(tmp, root / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _swap(root: Path, version: str, files: Sequence[str] = _FILES) -> None:
    """Publish `version`; switching `current` is the one step that does it, atomically.

    Before the switch every reader opens the old pool, after it the new one: `open_pool` reads a folder
    through `current` when there is one, and through its own top-level files only when there is not (the
    old layout). The top-level links are made before the switch where nothing is there yet (so a fresh
    folder never holds `current` without `pool.json`), and after it where an old-layout file is replaced.
    """
    links = {f: f"{_CURRENT}/{f}" for f in files}
    for f, want in links.items():
        if not (root / f).exists() and not (root / f).is_symlink():
            _link(root, f, want)
    _link(root, _CURRENT, version)
    _fsync(root)
    for f, want in links.items():
        if not ((root / f).is_symlink() and os.readlink(root / f) == want):
            _link(root, f, want)
    _fsync(root)


def _clean(root: Path, keep: str) -> None:
    """Delete replaced versions and leftovers of killed builds; only run with the lock held and the swap done."""
    for e in os.listdir(root):
        if e == keep:
            continue
        try:
            if _VERSION.fullmatch(e):
                shutil.rmtree(root / e)
            elif _TEMP.fullmatch(e):
                os.unlink(root / e)
        except OSError:
            pass  # tried again after the next build


def _published(root: Path, version: Path) -> bool:
    try:
        return _current(root) == version
    except (OSError, PladaError):
        return False


def _current(root: Path) -> Path:
    """The folder holding the pool's files now: the version `current` names, or `root` itself (old layout)."""
    link = root / _CURRENT
    if not link.is_symlink():
        return root
    target = os.readlink(link)
    if not _VERSION.fullmatch(target):
        raise PladaError(f"pool {root} is damaged: '{_CURRENT}' points at {target!r}, not a pool version")
    return root / target


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
    for _ in range(8):
        version = _current(root)
        try:
            return _open_version(version, root)
        except (OSError, PladaError):
            if _current(root) == version:  # not a rebuild deleting what we were reading: a real error
                raise
    raise PladaError(f"pool {root} was rebuilt 8 times while being opened; try again")


def _open_version(folder: Path, root: Path) -> Pool:
    """The pool whose files are in `folder` (a version, or an old-layout pool folder), checked whole."""
    rebuild = "rebuild it with `plada pool build`"
    try:
        meta = json.loads((folder / "pool.json").read_bytes())
    except (OSError, ValueError):
        raise PladaError(f"pool {root} is damaged: pool.json is unreadable; {rebuild}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), str) or not isinstance(
            meta.get("name"), str):
        raise PladaError(f"pool {root} is damaged: pool.json lacks its name or fingerprint; {rebuild}")
    try:
        paths, hashes, text = read_manifest(folder / "manifest.tsv")
    except PladaError as e:
        raise PladaError(f"pool {root} is damaged: {e}") from None
    fp = hashlib.sha256(text).hexdigest()
    if fp != meta["fingerprint"]:
        raise PladaError(f"pool {root} is damaged: its manifest does not match its recorded fingerprint")
    if meta.get("kind") == _KIND_FILES:
        return _open_files(folder, root, meta, paths, hashes, fp)
    try:
        images = np.load(folder / "images.npy", mmap_mode="r")
        missing = np.load(folder / "missing.npy") if (folder / "missing.npy").is_file() else None  # older: complete
    except (OSError, ValueError, EOFError):
        raise PladaError(f"pool {root} is damaged: its images or missing mask cannot be read; {rebuild}") from None
    if len(images) != len(paths):
        raise PladaError(f"pool {root} is damaged: {len(images)} images for {len(paths)} manifest rows")
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
    atomic_write(out, manifest_text(pool.paths, pool.hashes))  # the open pool's, whatever a rebuild did since
    return out
