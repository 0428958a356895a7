"""ImageFolder datasets, decoded once into a memory-mapped uint8 cache.

Why a cache: a `.tar.xz` can only be read front to back (random member access re-decompresses
from the start), and JPEG/PNG decoding of 100k+ images costs a minute on two cores. So every
source is streamed once in archive order, decoded to one `(N, H, W, 3)` uint8 array per source
and memory-mapped afterwards: later runs start in seconds. The cache key is the hash of the
source's content (the archive's bytes, or every image file's path and bytes in a folder; sizes and
mtimes can be kept by an edit, `cp` then `touch -r`), so an edited source is never served stale.
A cache entry that is damaged anyway (torn write, disk fault) is rebuilt, not fatal.

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
import re
import secrets
import shutil
import socket
import sys
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
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
CACHE_VERSION = 2  # 2: 16-bit greyscale scaled to 8 bits, not clipped at 255


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


def _walk_files(src: Path, path_order: bool = False) -> Iterator[tuple[str, str]]:
    """(posix path relative to `src`, full path) of every file under `src`, in `sorted(src.rglob("*"))` order.

    Why not that one-liner: it holds a Path for every entry of the tree at once (~0.6 kB each: 300 MB for a
    480k-image folder); this holds one folder's listing, and plain strings. Same order (siblings sorted by
    name, a folder's contents right after it) and rglob's rules (hidden files listed, symlinked folders not
    entered), except that a folder it cannot list is an error naming it: rglob skips it without a word, and
    a target missing a class folder would be sent as a dataset with one class fewer.

    ``path_order``: instead, in ``sorted(relative paths)`` order (a manifest's), still one folder's listing
    at a time. A folder sorts among its siblings as its name plus "/": every path below it starts so, and a
    file name cannot hold "/", so sibling order decides the order of everything beneath them.
    """

    def key(e: os.DirEntry) -> str:
        try:
            return e.name + "/" if path_order and e.is_dir(follow_symlinks=False) else e.name
        except OSError:
            return e.name

    def walk(folder: str, prefix: str) -> Iterator[tuple[str, str]]:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=key)
        except OSError as e:
            raise PladaError(f"cannot read folder {_shown(folder)}: {e.strerror or e}") from None
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


def _shown(name: str) -> str:
    """A file name printable on one line whatever its bytes (undecodable bytes as \\xNN)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _check_name(rel: str, src: Path) -> None:
    """Refuse an image whose name is not UTF-8: paths go into JSON caches, manifests and payload groups."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise PladaError(f"{src}: image file name is not valid UTF-8: {_shown(rel)} (rename it)") from None


def _read_file(path: str) -> bytes | None:
    """A file's bytes, or None when the read fails (bad sector, dead device, permissions): skipped by name."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _iter_members(src: Path) -> Iterator[tuple[str, bytes | None]]:
    """(relative path, file bytes or None if unreadable) of every image, in the source's storage order."""
    if src.is_dir():
        for rel, path in _walk_files(src):
            if _is_image(rel):
                yield rel, _read_file(path)
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
        why = ("not a tar archive (plain, gz, bz2 or xz), or a damaged one" if isinstance(e, tarfile.ReadError)
               else " ".join(str(e).split()))
        raise PladaError(f"cannot read archive {src}: {why}") from None


def source_hash(src: Path) -> str:
    """Content hash of an archive, or of a folder's image files (path and bytes of each): the cache key.

    Why bytes, not sizes and mtimes: `cp` of a same-sized file then `touch -r` keeps both, and the cache
    would serve the old pixels (and a pool built from it the old fingerprint). Only image files count, as
    only they are decoded; an unreadable one counts as such, so it is read again once it can be. Measured
    on 3,000 PNGs of 3 kB (2 shared cores, warm page cache): 0.07-0.09 s, against 0.02 s for the old
    (size, mtime) listing; one file after another, as a thread pool was 3-5 times slower there (per-file
    overhead and the GIL outweigh overlapping reads of small cached files).
    """
    h = hashlib.sha256()
    if src.is_dir():
        for rel, path in _walk_files(src):
            if _is_image(rel):
                raw = _read_file(path)
                digest = "unreadable" if raw is None else hashlib.blake2b(raw, digest_size=16).hexdigest()
                # surrogateescape: a non-UTF-8 name is refused by `_stream` (if in the layout), not here
                h.update(f"{rel}\t{digest}\n".encode("utf-8", "surrogateescape"))
    else:
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (modes I;16*, and I as 16-bit PNG/TIFF give it) scaled to 8 bits.

    Why: PIL's convert to RGB clips these at 255 instead of scaling, so all but the darkest pixels go white.
    Values are taken as 0..65535 (mode I clipped to that range) and rounded to v * 255 / 65535.
    """
    v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
    return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")


def _decode(raw: bytes) -> Image.Image:
    with warnings.catch_warnings():
        # PIL only warns below twice its pixel limit; a pool image that large is hostile or broken.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(raw))
        img.load()
        if img.mode == "I" or img.mode.startswith("I;16"):
            img = _to_8bit(img)
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
    images: np.ndarray  # (N, R, R, 3) uint8, memory-mapped; `open_target`'s: a `LazyImages` over the files
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
        if _is_lazy(self.images):  # files read on access (`open_target`): rows stay undecoded
            images = self.images.take(sel)
        else:
            images = self.images[sel[0] : sel[-1] + 1] if contiguous else self.images[sel]
        files = [self.paths[i].split("/", 1)[1] for i in idx]
        return Split(self.name, split, images, np.asarray([lut[c] for c in cls], dtype=np.int64), names, files,
                     [self.hashes[i] for i in idx])


@dataclass
class Split:
    """A labelled split held as tensors-to-be: uint8 images, int64 labels, class names."""

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    files: list[str] | None = None  # "class/file" per row, where the source has names (held-out grouping)
    hashes: list[str] | None = None  # per row, its image file's hash (`Source.hashes`), where the source has them

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """Hash of exactly what a model trained on this split sees: each row's image content and label.

        Why: caches keyed by anything coarser (sizes, label sums, a few rows' pixels) serve a stale teacher
        when images move between classes. Rows are identified by their file hashes when the split has them
        (cheap), else by their pixels; the decoded shape and decoder version are included, since the same
        files decode to other pixels at another cached resolution or decoder.
        """
        h = hashlib.sha256(json.dumps([CACHE_VERSION, list(self.images.shape[1:]), str(self.images.dtype),
                                       self.class_names, len(self)]).encode())
        h.update(np.ascontiguousarray(self.labels, dtype=np.int64).tobytes())
        if self.hashes is not None and len(self.hashes) == len(self):
            h.update("\n".join(self.hashes).encode())
        else:
            for a in range(0, len(self), 4096):
                h.update(np.ascontiguousarray(self.images[a : a + 4096]).tobytes())
        return h.hexdigest()

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
        """The rows `idx`, loaded into memory (files read on access stay undecoded: `LazyImages.take`)."""
        rows = np.asarray(idx)
        files = None if self.files is None else [self.files[i] for i in rows]
        hashes = None if self.hashes is None else [self.hashes[i] for i in rows]
        images = self.images.take(rows) if _is_lazy(self.images) else np.asarray(self.images[idx])
        return Split(self.dataset, self.split, images, self.labels[idx], self.class_names, files, hashes)


_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
# `.NAME.PID@HOST.RAND.tmp` (HOST: this machine's tag), or `.NAME.PID.RAND.tmp` from before the tag.
_TMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)(?:@(?P<host>[0-9a-f]{8}))?\.[0-9a-f]{8}\.tmp$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def sweep_temps(folder: str | os.PathLike) -> int:
    """Remove the temporary files of `atomic_write`s killed mid-write (SIGKILL, power loss) in `folder`.

    Why by pid: a temp of a writer that is still running must stay, and only its name says whose it is;
    one from another machine sharing the cache (another host tag) is left alone, as its pid means nothing
    here. Returns how many were removed.
    """
    removed = 0
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.endswith(".tmp") and e.name.startswith(".")]
    except OSError:
        return 0
    for name in names:
        m = _TMP_RE.match(name)
        if m is None or (m["host"] is not None and m["host"] != _HOST) or _pid_alive(int(m["pid"])):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed += 1
        except OSError:
            pass
    return removed


_swept: set[str] = set()  # folders this process has swept: once is enough, its own temps are never left


def atomic_write(path: str | os.PathLike, data: bytes | Callable[[io.BufferedWriter], object]) -> None:
    """Write via a unique temporary file, fsync and rename: a crash leaves the old file or none, never half.

    The temporary file's name carries this process's pid, so the first write into a folder removes what
    dead predecessors left there (`sweep_temps`).
    """
    path = Path(path)
    folder = os.path.abspath(path.parent)
    if folder not in _swept:
        sweep_temps(folder)
        _swept.add(folder)
    tmp = path.with_name(f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(4)}.tmp")
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


def atomic_save_rows(path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | type,
                     blocks: Iterable[np.ndarray]) -> None:
    """An `.npy` of `shape` written block by block (rows in order), atomically, never whole in memory.

    Why plain writes rather than a writable memmap: the dirty pages of a memmap count in the writer's
    resident memory until the kernel flushes them, a file written through `write` holds one block. The
    result reads back with `np.load(path, mmap_mode="r")` like any `.npy`.
    """
    dt = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": tuple(shape)}

    def write(f: io.BufferedWriter) -> None:
        np.lib.format.write_array_header_1_0(f, header)
        rows = 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=dt)
            if block.shape[1:] != tuple(shape[1:]):
                raise ValueError(f"block of shape {block.shape} in an array of shape {tuple(shape)}")
            f.write(memoryview(block).cast("B"))
            rows += len(block)
        if rows != shape[0]:
            raise ValueError(f"{rows} rows written for an array of {shape[0]}")

    atomic_write(path, write)


BLOCK_BYTES = 4 * 2**20  # float64 bytes per block of `map_rows`: 4096 rows of 128 classes, 524 of 1000


def map_rows(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, rows: int | None = None) -> np.ndarray:
    """`fn(x)` for a row-wise `fn`, computed `rows` rows at a time into one output.

    Why: per-row reductions over an (N, C) memmap would otherwise make (N, C) float64 temporaries; by
    blocks the extra memory is one block's (by default `BLOCK_BYTES` as float64, whatever C is), and each
    row's result is bit-identical to `fn(x)` (numpy reduces each row on its own, whatever the row count).
    """
    n = len(x)
    width = int(np.prod(np.shape(x)[1:], dtype=np.int64))
    rows = int(rows or max(1, BLOCK_BYTES // (8 * max(width, 1))))
    if n <= rows:
        return fn(x)
    first = fn(x[:rows])
    out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for a in range(rows, n, rows):
        out[a : a + rows] = fn(x[a : a + rows])
    return out


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
            _check_name(rel, src)
            if rel in seen:
                raise PladaError(f"{src} lists the same image path twice")
            seen.add(rel)
            if raw is None:  # a read that failed: counted and named like an undecodable file
                skipped.append(rel)
                continue
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
    sweep_temps(root)
    cached = _open_cached(name, root)
    if cached is not None:
        return cached

    spooler = _Spooler(root.parent)
    try:
        got = _stream(src, spooler, progress)
        if got.skipped:  # said once, when the cache is built; the count stays in the cache's meta
            print(f"plada: warning: skipped {len(got.skipped)} unreadable image(s) in {src.name}, "
                  f"e.g. {got.skipped[0]}", file=sys.stderr)
        root.mkdir(parents=True, exist_ok=True)
        (root / "meta.json").unlink(missing_ok=True)  # a damaged or older entry: incomplete until rewritten
        _save_rows_npy(root / "images.npy", spooler.spool.rows(), got.rows, f"writing {name}", progress)
    finally:
        spooler.close()
    meta = {"version": CACHE_VERSION, "source": str(src), "paths": got.paths, "hashes": got.hashes,
            "skipped": got.skipped}
    write_json_atomic(root / "meta.json", meta)  # written last: its presence marks a complete cache
    return Source(name, root, np.load(root / "images.npy", mmap_mode="r"), got.paths, got.hashes, got.skipped)


def open_target(name_or_path: str, data: str | os.PathLike | None = None, progress: bool = True) -> Source:
    """A target dataset as a model reads it: a folder of large images from its files, else `load_source`.

    Why: `load_source` keeps every image at most `LARGE_RES` px (the fast path for the small targets of
    ../shared/data, whose figures were made so); a teacher at 224 px must see a folder of full-resolution
    photos at 224 px, cropped from the files (`images.LazyImages`), not 64-px copies scaled up. Archives
    (read front to back only) and folders of small square images of one size keep the decoded cache.
    """
    src = resolve_source(name_or_path, data)
    if not (src.is_dir() and _holds_large_images(src)):
        return load_source(name_or_path, data, progress)
    from .images import FolderFiles, LazyImages, scan_folder

    name = src.name
    found = scan_folder(src, progress=progress)  # headers checked, bytes hashed, the unreadable named once
    files, rels, hashes = [], [], []
    for path, digest in zip(found.paths, found.hashes, strict=True):
        sp = _split_path(path)
        if sp is not None:
            files.append(path)
            rels.append(sp[2])
            hashes.append(digest)
    if not rels:
        raise PladaError(f"{src} holds no images in the ImageFolder layout NAME/<split>/<class>/<image> "
                         "(or <split>/<class>/<image>)")
    if len(set(rels)) != len(rels):
        raise PladaError(f"{src} lists the same image path twice")
    order = sorted(range(len(rels)), key=rels.__getitem__)  # `NAME/` prefixes aside, already sorted
    files, rels, hashes = [files[i] for i in order], [rels[i] for i in order], [hashes[i] for i in order]
    key = hashlib.sha256("".join(f"{r}\t{h}\n" for r, h in zip(rels, hashes, strict=True)).encode()).hexdigest()
    images = LazyImages(FolderFiles(src, files), hashes=hashes, label=f"target '{name}'")
    return Source(name, cache_root() / "datasets" / f"{name}-files-{key[:16]}", images,  # type: ignore[arg-type]
                  rels, hashes, list(found.skipped))


def _is_lazy(images: object) -> bool:
    from .images import LazyImages  # here: plada.images imports this module

    return isinstance(images, LazyImages)


def _holds_large_images(src: Path) -> bool:
    """Whether `load_source`'s rule would shrink this folder's images: not all one square size <= MAX_NATIVE.

    Reads image headers only, and stops at the first image that breaks the rule (the first, for photos).
    """
    size = None
    for rel, path in _walk_files(src):
        if not _is_image(rel) or _split_path(rel) is None:
            continue
        try:
            with Image.open(path) as img:
                w, h = img.size
        except Exception:  # unreadable: `load_source` skips and names it; it decides nothing here
            continue
        if w != h or w > MAX_NATIVE or (size is not None and w != size):
            return True
        size = w
    return False


def _open_cached(name: str, root: Path) -> Source | None:
    """The decoded cache in `root`, or None when absent, from another version, or damaged (then rebuilt).

    Why not trust it: a disk fault or a copy cut short can tear `meta.json` or `images.npy` even though
    both are written atomically, and a torn entry must cost a rebuild, not every later run.
    """
    try:
        meta = json.loads((root / "meta.json").read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        return None
    paths, hashes, skipped = meta.get("paths"), meta.get("hashes"), meta.get("skipped")
    if not (isinstance(paths, list) and isinstance(hashes, list) and isinstance(skipped, list)
            and len(paths) == len(hashes)):
        return None
    try:
        images = np.load(root / "images.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(paths) or images.shape[3] != 3:
        return None
    return Source(name, root, images, paths, hashes, skipped)
