"""ImageFolder datasets, decoded once into a memory-mapped uint8 cache.

Why a cache: a `.tar.xz` can only be read front to back (random member access re-decompresses
from the start), and JPEG/PNG decoding of 100k+ images costs a minute on two cores. So every
source is streamed once in archive order, decoded to one `(N, H, W, 3)` uint8 array per source
and memory-mapped afterwards: later runs start in seconds. The cache key is the hash of the
source (the archive's bytes, or a folder's file list with sizes and mtimes), so an edited source
is never served stale.

Layout accepted (see ../shared/data/README.md): `NAME/<split>/<class>/<image>` inside an archive
(`.tar`, `.tar.gz`, `.tar.xz`) or a folder; a folder may also hold `<split>/<class>/<image>`
directly. Every image of a source is cached at one square resolution: its native size when all
images share one size no larger than `MAX_NATIVE`, else resized (shorter side) and centre-cropped
to `LARGE_RES`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .errors import PladaError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".gif", ".tif", ".tiff")
ARCHIVE_EXTS = (".tar.xz", ".tar.gz", ".tgz", ".tar")
MAX_NATIVE = 64
LARGE_RES = 64
CACHE_VERSION = 1


def cache_root() -> Path:
    """Where decoded datasets, pools, teachers and scores live (`PLADA_CACHE`, else XDG cache)."""
    env = os.environ.get("PLADA_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "plada"


def data_root(data: str | os.PathLike | None = None) -> Path:
    """The folder holding dataset archives: `--data`, else `PLADA_DATA`; it must exist."""
    raw = data if data is not None else os.environ.get("PLADA_DATA")
    if raw is None:
        raise PladaError("no data folder: pass --data DIR or set PLADA_DATA")
    root = Path(raw).expanduser()
    if not root.is_dir():
        raise PladaError(f"data folder not found: {root}")
    return root


def resolve_source(name_or_path: str, data: str | os.PathLike | None = None) -> Path:
    """A dataset given as a path, or as a name looked up in the data folder (NAME.tar.xz, NAME/...)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    if os.sep in name_or_path or name_or_path.endswith(ARCHIVE_EXTS):
        raise PladaError(f"dataset not found: {p}")
    root = data_root(data)
    for ext in ARCHIVE_EXTS:
        cand = root / f"{name_or_path}{ext}"
        if cand.is_file():
            return cand
    if (root / name_or_path).is_dir():
        return root / name_or_path
    names = sorted({f.name.split(".tar")[0] for f in root.iterdir() if f.name.endswith(ARCHIVE_EXTS)})
    raise PladaError(f"dataset '{name_or_path}' not found in {root} (have: {', '.join(names) or 'none'})")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def _split_path(rel: str) -> tuple[str, str, str] | None:
    """(split, class, relpath-from-dataset-root) for `[NAME/]split/class/file`, else None."""
    parts = [q for q in rel.replace("\\", "/").split("/") if q not in ("", ".")]
    if len(parts) == 4:
        parts = parts[1:]
    if len(parts) != 3:
        return None
    return parts[0], parts[1], "/".join(parts)


def _walk_files(src: Path) -> Iterator[tuple[str, str]]:
    """(posix path relative to `src`, full path) of every file under `src`, in `sorted(src.rglob("*"))` order.

    Why not that one-liner: it holds a Path for every entry of the tree at once (~0.6 kB each: 300 MB for a
    480k-image folder); this holds one folder's listing, and plain strings. Same order (siblings sorted by
    name, a folder's contents right after it) and rglob's rules (hidden files listed, symlinked folders not
    entered, unreadable folders skipped), so folder cache keys do not change.
    """

    def walk(folder: str, prefix: str) -> Iterator[tuple[str, str]]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            return
        for entry in entries:
            try:
                is_file, is_dir = entry.is_file(), entry.is_dir(follow_symlinks=False)
            except OSError:
                is_file = is_dir = False
            if is_file:
                yield prefix + entry.name, entry.path
            if is_dir:
                yield from walk(entry.path, f"{prefix}{entry.name}/")

    yield from walk(os.fspath(src), "")


def _iter_members(src: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, file bytes) of every image, in the source's own storage order, one at a time."""
    if src.is_dir():
        for rel, path in _walk_files(src):
            if _is_image(rel):
                with open(path, "rb") as f:
                    yield rel, f.read()
        return
    try:
        with tarfile.open(src, mode="r:*") as tar:
            # Archive order: out-of-order access re-decompresses xz from the start. `next()` rather than
            # iterating the TarFile, and its member list emptied as we go: tarfile otherwise keeps every
            # TarInfo (~0.3 kB each), which grows with the archive. Only regular files are extracted, and
            # those never look members up.
            while (m := tar.next()) is not None:
                tar.members.clear()
                if m.isfile() and _is_image(m.name):
                    f = tar.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PladaError(f"cannot read archive {src}: {e}") from None


def source_hash(src: Path) -> str:
    """Content hash of an archive, or of a folder's (path, size, mtime) listing: the cache key."""
    h = hashlib.sha256()
    if src.is_dir():
        for rel, path in _walk_files(src):
            st = os.stat(path)
            h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    else:
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _decode(raw: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # PIL only warns below twice its pixel limit; a pool image that large is hostile or broken.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(raw))
        img.load()
        return img.convert("RGB")


def _to_square(img: Image.Image, res: int) -> np.ndarray:
    if img.size != (res, res):
        w, h = img.size
        s = res / min(w, h)
        img = img.resize((max(res, round(w * s)), max(res, round(h * s))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - res) // 2, (h - res) // 2
        img = img.crop((left, top, left + res, top + res))
    return np.asarray(img, dtype=np.uint8)


@dataclass
class Source:
    """One decoded source: all its images in sorted-path order, with splits and classes."""

    name: str
    root: Path  # cache folder
    images: np.ndarray  # (N, R, R, 3) uint8, memory-mapped
    paths: list[str]  # "split/class/file", sorted
    hashes: list[str]  # blake2b-64 hex of each image file's bytes
    skipped: list[str]  # files that failed to decode

    @property
    def resolution(self) -> int:
        return int(self.images.shape[1])

    def splits(self) -> list[str]:
        return sorted({p.split("/", 1)[0] for p in self.paths})

    def split(self, split: str) -> Split:
        """Images and integer labels of one split; classes are the sorted folder names of that split."""
        idx = [i for i, p in enumerate(self.paths) if p.split("/", 1)[0] == split]
        if not idx:
            raise PladaError(f"dataset '{self.name}' has no split '{split}' (has: {', '.join(self.splits())})")
        cls = [self.paths[i].split("/")[1] for i in idx]
        names = sorted(set(cls))
        lut = {c: j for j, c in enumerate(names)}
        sel = np.asarray(idx, dtype=np.int64)
        contiguous = sel[-1] - sel[0] + 1 == len(sel)
        images = self.images[sel[0] : sel[-1] + 1] if contiguous else self.images[sel]
        files = [self.paths[i].split("/", 1)[1] for i in idx]
        return Split(self.name, split, images, np.asarray([lut[c] for c in cls], dtype=np.int64), names, files)


@dataclass
class Split:
    """A labelled split held as tensors-to-be: uint8 images, int64 labels, class names."""

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str] | None = None  # "class/file" per row, where the source has names (held-out grouping)

    def __len__(self) -> int:
        return len(self.labels)

    def subset_indices(self, n: int | None, seed: int = 0) -> np.ndarray:
        """The sorted rows `subset(n, seed)` takes: their complement is data the subset never saw."""
        if n is None or n >= len(self):
            return np.arange(len(self))
        return np.sort(np.random.default_rng(seed).permutation(len(self))[:n])

    def subset(self, n: int | None, seed: int = 0) -> Split:
        """A random subset of n images (all when n is None or too large)."""
        if n is None or n >= len(self):
            return self
        return self.take(self.subset_indices(n, seed))

    def take(self, idx: np.ndarray) -> Split:
        """The rows `idx`, loaded into memory."""
        files = None if self.files is None else [self.files[i] for i in np.asarray(idx)]
        return Split(self.dataset, self.split, np.asarray(self.images[idx]), self.labels[idx], self.class_names, files)


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[io.BufferedWriter], object]) -> None:
    """Write via a unique temporary file, fsync and rename: a crash leaves the old file or none, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save_npy(path: str | os.PathLike, arr: np.ndarray) -> None:
    """`np.save`, atomically."""
    atomic_write(path, lambda f: np.save(f, arr))


@contextmanager
def building_dir(final: Path) -> Iterator[Path]:
    """A folder built beside `final` and renamed into place whole, or removed on any error."""
    tmp = final.with_name(final.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """JSON written via a temporary file and rename, so a crash never leaves half a file."""
    atomic_write(path, json.dumps(obj, indent=1, sort_keys=True).encode())


class _PixelSpool:
    """Decoded pixels appended as fixed-size rows to an unnamed temporary file.

    Why a file: a large source's raw bytes, PIL images or pixel array each cost gigabytes of memory, while
    its rows on disk cost page cache only. Fixed-size rows make a row's index its offset. The file is made
    beside the cache folder, not in /tmp (often RAM-backed tmpfs), and has no name: it vanishes when closed,
    or with the process, even on SIGKILL.
    """

    def __init__(self, folder: Path, res: int) -> None:
        self.res = res
        self.n = 0
        self._file = tempfile.TemporaryFile(dir=folder)

    def append(self, pixels: np.ndarray) -> None:
        assert pixels.shape == (self.res, self.res, 3) and pixels.dtype == np.uint8, pixels.shape
        self._file.write(np.ascontiguousarray(pixels).data)
        self.n += 1

    def rows(self) -> np.ndarray:
        """The rows so far, memory-mapped read-only."""
        self._file.flush()
        return np.memmap(self._file, dtype=np.uint8, mode="r", shape=(self.n, self.res, self.res, 3))

    def close(self) -> None:
        self._file.close()


class _Spooler:
    """Images to spool rows at the resolution `load_source` promises, decided image by image.

    The rule (native size if every image shares one square size <= MAX_NATIVE, else LARGE_RES for all) is
    only settled by the last image. So rows stay native while the rule can still hold, and the first image
    that breaks it converts the rows so far to LARGE_RES (row i stays row i). Converting the native rows
    equals converting the original images: `_decode` made them RGB, and `_to_square` of an RGB image
    depends on its pixels only.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.spool: _PixelSpool | None = None
        self.native = False

    def add(self, img: Image.Image) -> None:
        if self.spool is None:
            w, h = img.size
            self.native = w == h and w <= MAX_NATIVE
            self.folder.mkdir(parents=True, exist_ok=True)
            self.spool = _PixelSpool(self.folder, w if self.native else LARGE_RES)
        elif self.native and img.size != (self.spool.res, self.spool.res):
            self._to_large()
        self.spool.append(_to_square(img, self.spool.res))

    def _to_large(self) -> None:
        native = self.spool
        large = _PixelSpool(self.folder, LARGE_RES)
        try:
            for row in native.rows():
                large.append(_to_square(Image.fromarray(np.asarray(row)), LARGE_RES))
        except BaseException:
            large.close()
            raise
        native.close()
        self.spool, self.native = large, False

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()


@dataclass
class _Streamed:
    """What one pass over a source keeps: per-image metadata only, in sorted-path order."""

    paths: list[str]  # sorted
    hashes: list[str]  # of each path's file bytes
    rows: np.ndarray  # the spool row holding each path's pixels
    skipped: list[str]  # sorted


def _stream(src: Path, spooler: _Spooler, progress: bool) -> _Streamed:
    """Read, hash and decode every image once, in storage order, handing the pixels straight to `spooler`."""
    rels: list[str] = []  # of spool row i
    hashes: list[str] = []
    skipped: list[str] = []
    seen: set[str] = set()
    with (closing(_iter_members(src)) as members,
          tqdm(members, desc=f"reading+decoding {src.name}", unit="img", disable=not progress) as bar):
        for rel, raw in bar:
            sp = _split_path(rel)
            if sp is None:
                continue
            rel = sp[2]
            if rel in seen:
                raise PladaError(f"{src} lists the same image path twice")
            seen.add(rel)
            try:
                digest = hashlib.blake2b(raw, digest_size=8).hexdigest()
                img = _decode(raw)
            except Exception:  # PIL raises anything (SyntaxError, struct.error...) on hostile files
                skipped.append(rel)
                continue
            spooler.add(img)
            rels.append(rel)
            hashes.append(digest)
    if not seen:
        raise PladaError(
            f"{src} holds no images in the ImageFolder layout NAME/<split>/<class>/<image> "
            "(or <split>/<class>/<image>)"
        )
    if not rels:
        raise PladaError(f"no image in {src} could be decoded ({len(skipped)} unreadable)")
    order = sorted(range(len(rels)), key=rels.__getitem__)
    return _Streamed([rels[i] for i in order], [hashes[i] for i in order], np.asarray(order, dtype=np.intp),
                     sorted(skipped))


_CHUNK_BYTES = 1 << 20  # rows gathered per write: bounds memory, big enough to amortise the gather


def _save_rows_npy(path: Path, rows: np.ndarray, order: np.ndarray, desc: str, progress: bool) -> None:
    """`atomic_save_npy(path, rows[order])`, same bytes, without ever holding `rows[order]` in memory."""
    header = {"descr": np.lib.format.dtype_to_descr(rows.dtype), "fortran_order": False,
              "shape": (len(order), *rows.shape[1:])}
    step = max(1, _CHUNK_BYTES // rows[0].nbytes)

    def write(f: io.BufferedWriter) -> None:
        np.lib.format.write_array_header_1_0(f, header)  # np.save's choice too: 1.0 whenever the header fits
        with tqdm(total=len(order), desc=desc, unit="img", disable=not progress) as bar:
            for i in range(0, len(order), step):
                f.write(np.ascontiguousarray(rows[order[i : i + step]]).data)
                bar.update(min(step, len(order) - i))

    atomic_write(path, write)


def load_source(name_or_path: str, data: str | os.PathLike | None = None, progress: bool = True) -> Source:
    """Decode a dataset source once (streaming, archive order) and return it memory-mapped.

    Memory stays at per-image metadata (path, hash) however large the source: pixels go to a temporary
    spool beside the cache as they are decoded, then into `images.npy` in sorted-path order, chunk by chunk.
    """
    src = resolve_source(name_or_path, data)
    name = src.name.split(".tar")[0].split(".tgz")[0]
    key = source_hash(src)[:16]
    root = cache_root() / "datasets" / f"{name}-{key}"
    meta_path = root / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == CACHE_VERSION:
            images = np.load(root / "images.npy", mmap_mode="r")
            return Source(name, root, images, meta["paths"], meta["hashes"], meta["skipped"])

    spooler = _Spooler(root.parent)
    try:
        got = _stream(src, spooler, progress)
        if got.skipped:  # said once, when the cache is built; the count stays in the cache's meta
            print(f"plada: warning: skipped {len(got.skipped)} unreadable image(s) in {src.name}, "
                  f"e.g. {got.skipped[0]}", file=sys.stderr)
        root.mkdir(parents=True, exist_ok=True)
        _save_rows_npy(root / "images.npy", spooler.spool.rows(), got.rows, f"writing {name}", progress)
    finally:
        spooler.close()
    meta = {"version": CACHE_VERSION, "source": str(src), "paths": got.paths, "hashes": got.hashes,
            "skipped": got.skipped}
    write_json_atomic(meta_path, meta)  # written last: its presence marks a complete cache
    return Source(name, root, np.load(root / "images.npy", mmap_mode="r"), got.paths, got.hashes, got.skipped)


def load_split(name_or_path: str, split: str, data: str | os.PathLike | None = None) -> Split:
    """Shorthand: one split of a dataset source."""
    return load_source(name_or_path, data).split(split)
