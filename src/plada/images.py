"""Pool images as users hold them: image files decoded on access, at the resolution the model asks for.

Why not the decoded cache (`plada.data`): ImageNet-1K's 1.28M JPEGs are 190 GB as 224 px uint8, and a
model at 224 px read from a 64 px cache sees blurred pixels. So a folder or WebDataset pool keeps only
its manifest and where each image's bytes are (a file under a root, or a byte range of a tar shard);
`LazyImages` decodes rows when they are read, at the resolution it was opened at, and drops in wherever
`pool.images[a:b]` is sliced. Decoding uses a thread pool (PIL releases the GIL while decoding and
resizing), with the next batch decoded while the current one is consumed (`LazyImages.batches`). On a
machine whose accelerator outruns one Python process's decoding, `PLADA_DECODE_PROCESSES=N` streams the
batches from N forked worker processes instead, each decoding whole batches into shared memory: the same
pixels, the same bad-row accounting.

Safety, since pool files are whoever's bytes: an image whose header declares more than `MAX_PIXELS`
pixels is refused from the header alone, before PIL allocates its pixels (a 60000x60000 PNG of a few
kilobytes would otherwise ask for 10 GB); a file that fails to read or decode, or whose bytes no longer
hash to its manifest entry, reads as a zero row, is recorded (`LazyImages.bad`) and named once in one
warning line, and never aborts a run.

Manifest paths: a folder's images are keyed by their path under its root (`n01440764/x.JPEG`); a shard
sample by its original file name (`filename` or `fname` in its `.json` member), else by its WebDataset key
plus extension; a bare ImageNet train name (`n01440764_10026.JPEG`) gets its class folder back. Hashes
are those of every manifest (blake2b-64 of the file's bytes), so the same images
held as a folder or as shards in any order and shuffle give one manifest and one fingerprint.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import multiprocessing
import os
import re
import sys
import tarfile
import threading
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from tqdm import tqdm

from .data import _check_name, _is_image, _shown, _to_8bit, _to_square, _walk_files
from .errors import PladaError
from .manifest import ManifestWriter

__all__ = ["DEFAULT_RES", "MAX_PIXELS", "BadImage", "FolderFiles", "LazyImages", "Scanned", "TarMembers", "at_size",
           "check_header", "crop_box", "decode", "decode_crop", "file_hash", "layout_of", "scan_folder", "scan_shards"]

# Below PIL's own refusal (2 * Image.MAX_IMAGE_PIXELS, about 179M), so this is the limit that applies, and it
# holds even where a program has switched PIL's off. 134M pixels: an 11,585 px square photo still passes.
MAX_PIXELS = 2**27
DEFAULT_RES = 224  # what `Pool.images` of a lazy pool decodes at; models ask for their own via `images_at`
DRAFT_GAP = 2.0  # JPEG DCT downscaling stops at twice the target size, so the final resize still antialiases
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when one sample has several
NAME_KEYS = ("filename", "fname")
PROCESSES_ENV = "PLADA_DECODE_PROCESSES"  # worker processes that decode streamed batches (unset or 0: threads)
RRC_SCALE = (0.08, 1.0)  # training crops: share of the image's area (timm's and torchvision's default)
RRC_RATIO = (3 / 4, 4 / 3)  # ... and aspect ratio, drawn log-uniformly (the same default)


def at_size(images: np.ndarray, res: int) -> np.ndarray:
    """Images read from files (`LazyImages`) decoded at `res`; a decoded array as it is.

    Why: a file is resized once, from its full resolution, to what the model takes; a decoded array keeps its
    size and `train.prepare` resizes its rows, so every figure made from a decoded cache stays byte-identical.
    """
    at = getattr(images, "at", None)
    return images if at is None else at(res)


def decode_processes() -> int:
    """Worker processes for streamed decoding, from $PLADA_DECODE_PROCESSES; a bad value is a one-line error."""
    text = os.environ.get(PROCESSES_ENV, "").strip()
    try:
        n = int(text or 0)
    except ValueError:
        n = -1
    if not 0 <= n <= 256:
        raise PladaError(f"{PROCESSES_ENV} must be an integer from 0 (threads) to 256, got {text!r}")
    if n and "fork" not in multiprocessing.get_all_start_methods():
        raise PladaError(f"{PROCESSES_ENV} needs the fork start method (Linux); unset it to decode in threads")
    return n


# What a forked decoding worker reads: the parent's `LazyImages` and shared batch slots, inherited, never pickled
# (a 14M-row manifest would otherwise be copied into every worker).
_WORKER: tuple[LazyImages, np.ndarray] | None = None


def _worker_init(images: LazyImages, slots: np.ndarray) -> None:
    global _WORKER
    _WORKER = (images, slots)


def _worker_decode(slot: int, a: int, b: int) -> list[tuple[int, str]]:
    images, slots = _WORKER  # type: ignore[misc]
    out = slots[slot, : b - a]
    out[...] = 0
    return images._decode_into(np.arange(a, b, dtype=np.int64), out)
# ImageNet's train files are named for their class (`n01440764_10026.JPEG` in folder `n01440764/`); shards
# built from them (timm's ImageNet-21K ones) often record the bare name. Such a name gets its folder back,
# so the shards give the folder pool's manifest and fingerprint and group by class as the folder does.
IMAGENET_NAME = re.compile(r"(n\d{8})_[^/]+")
_BLOCK = 2048  # files hashed per thread-pool round: bounds the futures (and bytes) held at once


class BadImage(Exception):
    """An image that reads as a zero row; the message says why, for the one warning line."""


def file_hash(raw: bytes) -> str:
    """The manifest hash of a file's bytes: blake2b-64 hex, as `plada.data` hashes every source image."""
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


def _open(raw: bytes, max_pixels: int) -> Image.Image:
    """The image's header parsed (pixels not yet read), refused when it declares more than `max_pixels`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below is the rule
        try:
            img = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError:
            raise BadImage("declares too many pixels (decompression bomb): refused unread") from None
        except Exception as e:  # PIL raises many types on hostile headers
            raise BadImage(f"not an image PIL can read ({type(e).__name__})") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > max_pixels:
        img.close()
        raise BadImage(f"declares {w}x{h} pixels (limit {max_pixels}): refused unread")
    return img


def check_header(raw: bytes, max_pixels: int = MAX_PIXELS) -> None:
    """Raise `BadImage` unless `raw` starts like an image of at most `max_pixels`: what a pool build admits."""
    _open(raw, max_pixels).close()


def decode(raw: bytes, res: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`(res, res, 3)` uint8: shorter side resized to `res` (antialiased), centre-cropped, as `data._to_square`.

    A JPEG much larger than needed is first downscaled in the DCT domain (`draft`), which decodes a 4000 px
    photo for 224 px at a fraction of the time and memory; it stops at `DRAFT_GAP` times the target.
    """
    img, _ = _load_rgb(raw, res, max_pixels, None)
    return _to_square(img, res)


def decode_crop(raw: bytes, res: int, draw: Sequence[float], max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """`(res, res, 3)` uint8: the random-resized crop `crop_box` makes of four uniform draws, resized to `res`.

    Why from the file and not from a decoded square: the crop may be any part of the full image, as in
    every ImageNet training recipe, and a small crop resized up keeps the file's detail. A JPEG is
    DCT-downscaled only as far as the crop still has `DRAFT_GAP` times `res` pixels on its shorter side.
    """
    img, (x0, y0, x1, y1) = _load_rgb(raw, res, max_pixels, draw)
    w, h = img.size  # PIL refuses a box past the image by any margin: float rounding is clamped away
    box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
    try:
        return np.asarray(img.resize((res, res), Image.BILINEAR, box=box), dtype=np.uint8)
    except Exception as e:  # a read as a zero row, as every other undecodable file
        raise BadImage(f"cannot be cropped ({' '.join(str(e).split())[:80] or type(e).__name__})") from None


def crop_box(w: int, h: int, draw: Sequence[float]) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a random-resized crop of a `w` x `h` image, from four draws in [0, 1).

    Area share uniform in `RRC_SCALE`, aspect ratio log-uniform in `RRC_RATIO`, position uniform. One draw
    clamped to the image where torchvision retries up to ten times: the same boxes wherever a first try
    fits (all but the widest ratios of large crops), and a pure function of the draws, so a batch is the
    same whatever order its files decode in.
    """
    u_area, u_ratio, u_x, u_y = (float(v) for v in draw)
    area = w * h * (RRC_SCALE[0] + u_area * (RRC_SCALE[1] - RRC_SCALE[0]))
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    ratio = math.exp(lo + u_ratio * (hi - lo))
    cw, ch = min(float(w), math.sqrt(area * ratio)), min(float(h), math.sqrt(area / ratio))
    x0, y0 = u_x * (w - cw), u_y * (h - ch)
    return x0, y0, x0 + cw, y0 + ch


def _load_rgb(raw: bytes, res: int, max_pixels: int,
              draw: Sequence[float] | None) -> tuple[Image.Image, tuple[float, float, float, float] | None]:
    """The image as RGB, JPEG-drafted as far as `res` allows, and (given `draw`) its crop box in those pixels."""
    img = _open(raw, max_pixels)
    try:
        with img:
            w, h = img.size
            box = crop_box(w, h, draw) if draw is not None else None
            short = min(w, h) if box is None else min(box[2] - box[0], box[3] - box[1])
            if img.format == "JPEG":
                s = res * DRAFT_GAP / max(short, 1e-9)
                if s < 0.5:  # at least a 2x DCT reduction is possible
                    img.draft("RGB", (max(1, math.ceil(w * s)), max(1, math.ceil(h * s))))
            img.load()
            if img.mode == "I" or img.mode.startswith("I;16"):
                img = _to_8bit(img)
            rgb = img.convert("RGB")
        if box is not None:
            fx, fy = rgb.size[0] / w, rgb.size[1] / h  # the draft's actual reduction
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        return rgb, box
    except BadImage:
        raise
    except Exception as e:  # truncated data (OSError), broken streams (SyntaxError, struct.error, ...)
        raise BadImage(f"cannot be decoded ({' '.join(str(e).split())[:80] or type(e).__name__})") from None


class FolderFiles:
    """Image bytes of manifest rows held as files under one folder (`root / path`)."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.root = Path(root)
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> bytes:
        with open(self.root / self.paths[i], "rb") as f:
            return f.read()


class TarMembers:
    """Image bytes of manifest rows held as members of tar shards, read by byte offset (no tar parsing).

    `members` is `(N, 3)` int64: shard index (into `files`), data offset and size; shard -1 is a row this
    copy lacks. A read opens, preads and closes: file descriptors never pile up however many shards there are.
    """

    def __init__(self, files: Sequence[Path], members: np.ndarray, names: Sequence[str]) -> None:
        self.files = [Path(f) for f in files]
        self.members = members
        self.names = names

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        return self.names[i]

    def read(self, i: int) -> bytes:
        k, off, size = (int(v) for v in self.members[i])
        if k < 0:
            raise OSError("not held by any shard")
        fd = os.open(self.files[k], os.O_RDONLY)
        try:
            raw = os.pread(fd, size, off)
        finally:
            os.close(fd)
        if len(raw) != size:
            raise OSError(f"shard {self.files[k].name} is cut short")
        return raw


class _Source(Protocol):
    """What `LazyImages` needs of where the bytes are: `FolderFiles`, `TarMembers`, or a test's own."""

    def __len__(self) -> int: ...
    def name(self, i: int) -> str: ...
    def read(self, i: int) -> bytes: ...


class _Rows:
    """Some rows of another source, renumbered from 0: what `LazyImages.take` reads through."""

    def __init__(self, source: _Source, rows: np.ndarray) -> None:
        self.source, self.rows = source, rows

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        return self.source.name(int(self.rows[i]))

    def read(self, i: int) -> bytes:
        return self.source.read(int(self.rows[i]))


@dataclass
class _Bad:
    """Rows found unreadable, shared by every resolution view of one pool, so each is named once."""

    reasons: dict[int, str] = field(default_factory=dict)
    reported: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


class LazyImages:
    """A pool's images as an `(N, res, res, 3)` uint8 array-like, decoded from their files on access.

    Reading: an int, a slice, or an int or bool array gives a new uint8 array (decoded in a thread pool);
    `batches` streams a range with the next batch prefetched; `at(res)` is the same files at another size.
    """

    def __init__(self, source: _Source, res: int = DEFAULT_RES, hashes: Sequence[str] | None = None,
                 missing: np.ndarray | None = None, label: str = "pool", max_pixels: int = MAX_PIXELS,
                 workers: int | None = None, _bad: _Bad | None = None) -> None:
        if not 1 <= int(res) <= 4096:
            raise PladaError(f"image resolution {res} out of range 1..4096")
        self.source = source
        self.res = int(res)
        self.hashes = hashes  # when given, every read is checked against it (a file edited since the build)
        self.missing = missing
        self.label = label
        self.max_pixels = max_pixels
        self.workers = workers or min(32, os.cpu_count() or 1)
        self._bad = _bad or _Bad()
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.source), self.res, self.res, 3)

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        return f"<LazyImages {self.label}: {len(self)} images at {self.res} px>"

    def at(self, res: int) -> LazyImages:
        """The same files decoded at `res` (this view itself when it already is); bad rows are shared."""
        if int(res) == self.res:
            return self
        return LazyImages(self.source, res, self.hashes, self.missing, self.label, self.max_pixels, self.workers,
                          self._bad)

    # -- reading -------------------------------------------------------------------------------------

    def _positions(self, key: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        n = len(self)
        if isinstance(key, slice):
            return np.arange(*key.indices(n), dtype=np.int64)
        pos = np.asarray(key)
        if pos.dtype == bool:
            if pos.shape != (n,):
                raise IndexError(f"boolean index of shape {pos.shape} for {n} images")
            return np.flatnonzero(pos)
        if pos.size and not np.issubdtype(pos.dtype, np.integer):
            raise IndexError(f"images are indexed by integers, slices or boolean masks, not {pos.dtype}")
        pos = pos.astype(np.int64).ravel()
        pos = np.where(pos < 0, pos + n, pos)
        if pos.size and (pos.min() < 0 or pos.max() >= n):
            raise IndexError(f"index out of range for {n} images")
        return pos

    def _decode_into(self, pos: np.ndarray, out: np.ndarray,
                     draws: np.ndarray | None = None) -> list[tuple[int, str]]:
        """Decode rows `pos` into `out` (already zeros), cropped by `draws` when given; returns the failed rows."""
        bad = []
        for j, i in enumerate(pos.tolist()):
            if self.missing is not None and self.missing[i]:
                continue  # a row this copy lacks: zeros, as in a decoded pool, and not a fault of its file
            try:
                try:
                    raw = self.source.read(i)
                except OSError as e:
                    raise BadImage(f"cannot be read ({e.strerror or ' '.join(str(e).split())})") from None
                if self.hashes is not None and file_hash(raw) != self.hashes[i]:
                    raise BadImage("its bytes changed since the pool was built (hash differs from the manifest)")
                out[j] = (decode(raw, self.res, self.max_pixels) if draws is None
                          else decode_crop(raw, self.res, draws[j], self.max_pixels))
            except BadImage as e:
                bad.append((i, str(e)))
        return bad

    def _submit(self, ex: ThreadPoolExecutor, pos: np.ndarray,
                draws: np.ndarray | None = None) -> tuple[np.ndarray, list[Future]]:
        out = np.zeros((len(pos), self.res, self.res, 3), dtype=np.uint8)
        parts = np.array_split(np.arange(len(pos)), min(len(pos), self.workers * 4)) if len(pos) else []
        return out, [ex.submit(self._decode_part, pos, out, p, draws) for p in parts if len(p)]

    def _decode_part(self, pos: np.ndarray, out: np.ndarray, part: np.ndarray,
                     draws: np.ndarray | None = None) -> list[tuple[int, str]]:
        a, b = int(part[0]), int(part[-1]) + 1  # array_split parts are contiguous: out[a:b] is a view
        return self._decode_into(pos[a:b], out[a:b], None if draws is None else draws[a:b])

    def _collect(self, pending: tuple[np.ndarray, list[Future]]) -> np.ndarray:
        out, futures = pending
        self._record([b for f in futures for b in f.result()])
        return out

    def _record(self, found: list[tuple[int, str]]) -> None:
        if found:
            with self._bad.lock:
                for i, why in found:
                    self._bad.reasons.setdefault(i, why)

    def __getitem__(self, key: int | slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(key, int | np.integer):
            n = len(self)
            if not -n <= int(key) < n:
                raise IndexError(f"index {key} out of range for {n} images")
            return self[np.array([int(key) % n])][0]
        return self._read(self._positions(key), None)

    def crops(self, key: np.ndarray | Sequence[int], draws: np.ndarray) -> np.ndarray:
        """Rows `key` as random-resized crops (`crop_box`, one row of four draws in [0, 1) per image) at `res`.

        What `train.fit` reads for augmentation from a file-backed pool: the crop comes from the full file.
        """
        pos = self._positions(key)
        draws = np.asarray(draws, dtype=np.float64)
        if draws.shape != (len(pos), 4):
            raise ValueError(f"crops needs ({len(pos)}, 4) draws, got {draws.shape}")
        return self._read(pos, draws)

    def _read(self, pos: np.ndarray, draws: np.ndarray | None) -> np.ndarray:
        if len(pos) <= 1:  # no threads for one image
            out = np.zeros((len(pos), self.res, self.res, 3), dtype=np.uint8)
            self._record(self._decode_into(pos, out, draws))
        else:
            with ThreadPoolExecutor(min(self.workers, len(pos)), thread_name_prefix="plada-decode") as ex:
                out = self._collect(self._submit(ex, pos, draws))
        self.warn_bad()
        return out

    def take(self, key: np.ndarray | Sequence[int]) -> LazyImages:
        """Rows `key` as a `LazyImages` of their own, still undecoded: a receiver's kept images, say.

        Why: decoding 1% of ImageNet-21K at 224 px whole would be 21 GB of memory before a step runs.
        """
        pos = self._positions(key)
        hashes = None if self.hashes is None else [self.hashes[i] for i in pos.tolist()]
        missing = None if self.missing is None else self.missing[pos]
        return LazyImages(_Rows(self.source, pos), self.res, hashes, missing, self.label, self.max_pixels,
                          self.workers)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        arr = self[:]  # every image decoded in memory: only for small pools
        return arr if dtype is None else arr.astype(dtype)

    def batches(self, start: int = 0, stop: int | None = None, batch_size: int = 256, prefetch: int = 1,
                warn: bool = True) -> Iterator[np.ndarray]:
        """Rows `[start, stop)` as consecutive `batch_size` arrays, the next `prefetch` decoding meanwhile.

        Why prefetch: the consumer (a forward pass) and the decoders then overlap, so scoring runs at the
        speed of the slower of the two, not of their sum. `warn`: name new bad rows once the range is done.
        """
        n = len(self)
        stop = n if stop is None else min(int(stop), n)
        start = max(0, int(start))
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        bounds = deque((a, min(a + batch_size, stop)) for a in range(start, stop, batch_size))
        if not bounds:
            return
        procs = decode_processes()
        if procs and len(bounds) > 1:
            yield from self._process_batches(bounds, batch_size, procs, prefetch)
            if warn:
                self.warn_bad()
            return
        ex = ThreadPoolExecutor(self.workers, thread_name_prefix="plada-decode")
        try:
            queued: deque[tuple[np.ndarray, list[Future]]] = deque()
            while bounds or queued:
                while bounds and len(queued) <= prefetch:
                    a, b = bounds.popleft()
                    queued.append(self._submit(ex, np.arange(a, b, dtype=np.int64)))
                yield self._collect(queued.popleft())
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
        if warn:
            self.warn_bad()

    def _process_batches(self, bounds: deque, batch_size: int, procs: int, prefetch: int) -> Iterator[np.ndarray]:
        """`batches` from forked workers: each decodes a whole batch into a shared slot; the parent copies it out.

        Why slots in an anonymous shared mapping: a 224 px batch is ~38 MB, and sending it back pickled
        through a pipe would cost the parent as much as decoding saves. Up to ``procs + prefetch`` batches
        are in flight; a slot is refilled only after its batch was copied out, and batches come in order.
        """
        depth = min(len(bounds), procs + max(0, prefetch))
        shape = (depth, batch_size, self.res, self.res, 3)
        buf = mmap.mmap(-1, int(np.prod(shape)))  # MAP_SHARED | MAP_ANONYMOUS: forked workers write into it
        slots = np.frombuffer(buf, dtype=np.uint8).reshape(shape)
        ctx = multiprocessing.get_context("fork")
        ex = ProcessPoolExecutor(min(procs, depth), mp_context=ctx, initializer=_worker_init, initargs=(self, slots))
        try:
            queued: deque[tuple[int, int, int, Future]] = deque()
            free = deque(range(depth))
            while bounds or queued:
                while bounds and free:
                    a, b = bounds.popleft()
                    k = free.popleft()
                    queued.append((k, a, b, ex.submit(_worker_decode, k, a, b)))
                k, a, b, fut = queued.popleft()
                self._record(fut.result())
                batch = slots[k, : b - a].copy()
                free.append(k)
                yield batch
        finally:
            ex.shutdown(wait=True, cancel_futures=True)  # the mapping goes with its last view (the executor's)

    def stream(self, start: int, stop: int, batch_size: int = 256) -> BatchStream:
        """Rows `[start, stop)` as an array-like that `train.predict` slices batch by batch, prefetched."""
        return BatchStream(self, start, stop, batch_size)

    # -- bad rows --------------------------------------------------------------------------------------

    @property
    def bad(self) -> np.ndarray:
        """Sorted rows found unreadable so far (they read as zeros), across every resolution of this pool."""
        with self._bad.lock:
            return np.array(sorted(self._bad.reasons), dtype=np.int64)

    def bad_reason(self, i: int) -> str | None:
        return self._bad.reasons.get(int(i))

    def warn_bad(self) -> int:
        """Name the bad rows not yet named, in one line on stderr; returns how many that was.

        Why one line: a million-image run with a few hundred broken files must stay readable, and must
        still say which files they are, once, rather than abort or stay silent.
        """
        with self._bad.lock:
            new = sorted(set(self._bad.reasons) - self._bad.reported)
            self._bad.reported.update(new)
            why = [self._bad.reasons[i] for i in new[:5]]
        if not new:
            return 0
        shown = [f"{_shown(self.source.name(i))} ({w})" for i, w in zip(new, why, strict=False)]
        more = f" and {len(new) - 5} more" if len(new) > 5 else ""
        print(f"plada: warning: {len(new)} image(s) of {self.label} read as zeros: {'; '.join(shown)}{more}",
              file=sys.stderr)
        return len(new)


class BatchStream:
    """Rows `[start, stop)` of a `LazyImages`, served to a reader that slices them in order, batch by batch.

    Why: `train.predict` (both its CPU and accelerator loops) slices `images[a:a+batch_size]` in order; this
    answers those slices from `LazyImages.batches`, so each batch was decoding while the last one computed.
    Any other access is answered correctly by decoding it on the spot.
    """

    def __init__(self, images: LazyImages, start: int, stop: int, batch_size: int) -> None:
        self.images, self.start, self.batch_size = images, int(start), int(batch_size)
        self.stop = min(int(stop), len(images))
        self._it: Iterator[np.ndarray] | None = images.batches(self.start, self.stop, batch_size, warn=False)
        self._next = 0
        self.dtype, self.ndim = images.dtype, 4

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.stop - self.start, self.images.res, self.images.res, 3)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, slice) and key.step in (None, 1) and self._it is not None:
            a, b, _ = key.indices(len(self))
            if a == self._next and b == min(a + self.batch_size, len(self)) and a < b:
                batch = next(self._it)
                self._next = b
                return batch
        pos = np.arange(len(self))[key]  # any other key, checked as numpy checks it, decoded on the spot
        return self.images[self.start + pos]

    def close(self) -> None:
        if self._it is not None:
            self._it.close()  # type: ignore[attr-defined]
            self._it = None


# -- building a pool's manifest from files -----------------------------------------------------------------


@dataclass
class Scanned:
    """A source's images in manifest order: paths, hashes, and for shards where each one's bytes are."""

    paths: Sequence[str]
    hashes: Sequence[str]
    skipped: list[str]  # files refused (unreadable, not an image, a bomb), sorted; not in the manifest
    members: np.ndarray | None = None  # (N, 3) int64 shard, offset, size: shards only
    shards: list[str] | None = None  # shard file names under the root: shards only


def layout_of(path: Path) -> str | None:
    """`folder` (image files, e.g. `<wnid>/<file>.JPEG`), `shards` (WebDataset `.tar` files), or None.

    None: anything `plada.data.load_source` reads (an archive, or a `[NAME/]split/class/file` folder, whose
    first sub-folder holds folders), or a built pool. Only the first non-empty sub-folder is looked at.
    """
    if not path.is_dir() or (path / "pool.json").exists():
        return None
    try:
        with os.scandir(path) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return None
    files = [e.name for e in entries if e.is_file()]
    if any(_is_image(f) for f in files):
        return "folder"
    if any(f.endswith(".tar") for f in files):
        return "shards"
    for e in entries:
        if not e.is_dir(follow_symlinks=False):
            continue
        try:
            with os.scandir(e.path) as it:
                sub = list(it)
        except OSError:
            continue
        if any(s.is_file() and _is_image(s.name) for s in sub):
            return "folder"
        if sub:
            return None
    return None


def _inspect(read: Callable[[], bytes], max_pixels: int) -> tuple[str | None, str]:
    """(hash, "") of an admissible image's bytes, else (None, why)."""
    try:
        raw = read()
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"
    try:
        check_header(raw, max_pixels)
    except BadImage as e:
        return None, str(e)
    return file_hash(raw), ""


def _reader(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as f:
            return f.read()

    return read


def _warn_skipped(skipped: list[tuple[str, str]], where: Path) -> None:
    if skipped:
        shown = "; ".join(f"{_shown(name)} ({why})" for name, why in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"plada: warning: left {len(skipped)} file(s) of {where.name} out of the pool: {shown}{more}",
              file=sys.stderr)


def scan_folder(root: Path, progress: bool = True, workers: int | None = None,
                max_pixels: int = MAX_PIXELS) -> Scanned:
    """Every image file under `root` (any depth, any `data.IMAGE_EXTS` extension), hashed in parallel.

    Why threads: hashing and PIL's header parsing release the GIL over the bytes, and reads overlap; a
    file that cannot be read or is no admissible image is left out and named in one warning line.
    Why streamed: the walk yields paths already in manifest order (`_walk_files(path_order=True)`), so
    each block of hashes is written straight into the manifest's bytes; no list of every path and hash
    is ever held (at 14.2M images those lists alone cost about 2 GB more than the manifest itself).
    """
    root = Path(root)
    base = os.fspath(root)
    out = ManifestWriter()
    skipped: list[tuple[str, str]] = []

    def flush(block: list[str], ex: ThreadPoolExecutor) -> None:
        lines = []
        for rel, (h, why) in zip(block, ex.map(lambda r: _inspect(_reader(os.path.join(base, r)), max_pixels),
                                               block), strict=True):
            if h is None:
                skipped.append((rel, why))
            else:
                lines.append(f"{rel}\t{h}\n".encode())
        out.add(lines)
        bar.update(len(block))

    seen = 0
    with (ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as ex,
          tqdm(desc=f"hashing {root.name}", unit="img", disable=not progress) as bar):
        block: list[str] = []
        for rel, _ in _walk_files(root, path_order=True):
            if not _is_image(rel):
                continue
            _check_name(rel, root)
            block.append(rel)
            seen += 1
            if len(block) == _BLOCK:
                flush(block, ex)
                block = []
        if block:
            flush(block, ex)
    if not seen:
        raise PladaError(f"{root} holds no image files (.jpg, .jpeg, .png, .webp, ...)")
    _warn_skipped(skipped, root)
    if not len(out):
        raise PladaError(f"no image in {root} could be read ({len(skipped)} refused, e.g. {skipped[0][0]})")
    m = out.finish()  # canonical by construction; `pool` parses it again before use
    return Scanned(m.paths, m.hashes, [s for s, _ in skipped])


def _sample_parts(name: str) -> tuple[str, str]:
    """(WebDataset key, extension) of a member name: the key ends at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def _index_shard(path: Path, max_pixels: int) -> list[tuple[str, str | None, int, int, str]]:
    """(sample name, hash or None, offset, size, why refused) of each image sample in one shard."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            while (m := tar.next()) is not None:
                tar.members.clear()  # tarfile otherwise keeps every TarInfo of the shard
                if m.isfile():
                    key, ext = _sample_parts(m.name)
                    samples.setdefault(key, {})[ext.lower()] = m
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PladaError(f"cannot read shard {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for key, parts in samples.items():
            ext = next((e for e in WDS_IMAGE_EXTS if e in parts), None)
            if ext is None:
                continue  # a sample without an image (labels only, or another modality)
            m = parts[ext]
            name = key + "." + m.name.rpartition("/")[2].partition(".")[2]
            why = ""
            if "json" in parts:
                try:
                    meta = json.loads(os.pread(fd, parts["json"].size, parts["json"].offset_data))
                    given = next((meta[k] for k in NAME_KEYS if isinstance(meta, dict)
                                  and isinstance(meta.get(k), str) and meta[k]), None)
                    name = given or name
                except (ValueError, OSError):
                    why = "its .json record is unreadable"
            wnid = IMAGENET_NAME.fullmatch(name)
            if wnid:
                name = f"{wnid.group(1)}/{name}"
            if why:
                out.append((name, None, 0, 0, why))
                continue
            h, why = _inspect(lambda m=m: os.pread(fd, m.size, m.offset_data), max_pixels)
            out.append((name, h, m.offset_data, m.size, why))
    finally:
        os.close(fd)
    return out


def scan_shards(root: Path, progress: bool = True, workers: int | None = None,
                max_pixels: int = MAX_PIXELS) -> Scanned:
    """Every image sample of the `.tar` shards in `root`, keyed by its original name, shards indexed in parallel.

    The manifest is sorted by name, so shard order, sample order within shards and how samples were
    spread over shards change nothing; a name held twice is refused (it would make the order ambiguous).
    """
    root = Path(root)
    shards = sorted(f for f in os.listdir(root) if f.endswith(".tar") and (root / f).is_file())
    if not shards:
        raise PladaError(f"{root} holds no .tar shards")
    names: list[np.ndarray] = []  # per shard: sample names as UTF-8 bytes, their hashes, (offset, size)
    digests: list[np.ndarray] = []
    where: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    with (ThreadPoolExecutor(workers or min(32, os.cpu_count() or 1)) as ex,
          tqdm(total=len(shards), desc=f"indexing {root.name}", unit="shard", disable=not progress) as bar):
        for k, found in enumerate(ex.map(lambda f: _index_shard(root / f, max_pixels), shards)):
            good = [r for r in found if r[1] is not None]
            skipped += [(r[0], r[4]) for r in found if r[1] is None]
            try:
                names.append(np.array([r[0].encode("utf-8") for r in good], dtype=bytes))  # this shard's width
            except UnicodeEncodeError:
                bad = next(r[0] for r in good if not _utf8(r[0]))
                raise PladaError(f"{root}: sample name is not valid UTF-8: {_shown(bad)}") from None
            digests.append(np.array([r[1] for r in good], dtype="S16"))
            where.append(np.array([(k, r[2], r[3]) for r in good], dtype=np.int64).reshape(-1, 3))
            bar.update(1)
    # Sorted in numpy, one fixed-width byte string per sample (byte order is UTF-8 order, so `sorted(str)`
    # order): a few tens of bytes a sample, where a list of Python tuples cost about 0.3 KB each.
    key = np.concatenate(names) if names else np.zeros(0, dtype="S1")  # the widest shard's width
    names.clear()
    order = np.argsort(key, kind="stable")
    key = key[order]
    dup = np.flatnonzero(key[1:] == key[:-1])
    members = np.concatenate(where)[order] if where else np.zeros((0, 3), dtype=np.int64)
    if len(dup):
        i = int(dup[0])
        raise PladaError(f"shards in {root} hold the image '{_shown(key[i].decode())}' twice "
                         f"({shards[members[i, 0]]}, {shards[members[i + 1, 0]]}): one name must be one image")
    hashes = np.concatenate(digests)[order] if digests else np.zeros(0, dtype="S16")
    _warn_skipped(sorted(skipped), root)
    if not len(key):
        raise PladaError(f"no image in the shards of {root} could be read")
    out = ManifestWriter()
    for a in range(0, len(key), 65536):  # the manifest's bytes a block at a time
        out.add([n + b"\t" + h + b"\n" for n, h in zip(key[a:a + 65536].tolist(), hashes[a:a + 65536].tolist(),
                                                       strict=True)])
    m = out.finish()
    return Scanned(m.paths, m.hashes, sorted(n for n, _ in skipped), members, shards)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
