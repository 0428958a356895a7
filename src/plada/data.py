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
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def _iter_members(src: Path) -> Iterator[tuple[str, bytes]]:
    """(relative path, file bytes) of every image, in the source's own storage order."""
    if src.is_dir():
        for path in sorted(src.rglob("*")):
            if path.is_file() and _is_image(path.name):
                yield path.relative_to(src).as_posix(), path.read_bytes()
        return
    try:
        with tarfile.open(src, mode="r:*") as tar:
            for m in tar:  # archive order: out-of-order access re-decompresses xz from the start
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
        for path in sorted(src.rglob("*")):
            if path.is_file():
                st = path.stat()
                h.update(f"{path.relative_to(src).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
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
        return Split(self.name, split, images, np.asarray([lut[c] for c in cls], dtype=np.int64), names)


@dataclass
class Split:
    """A labelled split held as tensors-to-be: uint8 images, int64 labels, class names."""

    dataset: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

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
        return Split(self.dataset, self.split, np.asarray(self.images[idx]), self.labels[idx], self.class_names)


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


def load_source(name_or_path: str, data: str | os.PathLike | None = None, progress: bool = True) -> Source:
    """Decode a dataset source once (streaming, archive order) and return it memory-mapped."""
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

    entries: list[tuple[str, bytes]] = []
    for rel, raw in tqdm(_iter_members(src), desc=f"reading {src.name}", unit="img", disable=not progress):
        sp = _split_path(rel)
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

    decoded: list[tuple[str, str, Image.Image]] = []
    skipped: list[str] = []
    for rel, raw in tqdm(entries, desc=f"decoding {name}", unit="img", disable=not progress):
        try:
            decoded.append((rel, hashlib.blake2b(raw, digest_size=8).hexdigest(), _decode(raw)))
        except Exception:  # PIL raises anything (SyntaxError, struct.error...) on hostile files
            skipped.append(rel)
    del entries
    if not decoded:
        raise PladaError(f"no image in {src} could be decoded ({len(skipped)} unreadable)")
    if skipped:  # said once, when the cache is built; the count stays in the cache's meta
        print(f"plada: warning: skipped {len(skipped)} unreadable image(s) in {src.name}, e.g. {skipped[0]}",
              file=sys.stderr)
    sizes = {img.size for _, _, img in decoded}
    if len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1] and next(iter(sizes))[0] <= MAX_NATIVE:
        res = next(iter(sizes))[0]
    else:
        res = LARGE_RES
    images = np.empty((len(decoded), res, res, 3), dtype=np.uint8)
    for i, (_, _, img) in enumerate(decoded):
        images[i] = _to_square(img, res)

    root.mkdir(parents=True, exist_ok=True)
    atomic_save_npy(root / "images.npy", images)
    meta = {
        "version": CACHE_VERSION,
        "source": str(src),
        "paths": [d[0] for d in decoded],
        "hashes": [d[1] for d in decoded],
        "skipped": skipped,
    }
    write_json_atomic(meta_path, meta)  # written last: its presence marks a complete cache
    return Source(name, root, np.load(root / "images.npy", mmap_mode="r"), meta["paths"], meta["hashes"], skipped)


def load_split(name_or_path: str, split: str, data: str | os.PathLike | None = None) -> Split:
    """Shorthand: one split of a dataset source."""
    return load_source(name_or_path, data).split(split)
