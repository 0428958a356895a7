"""The `.plada` payload, format 1.0: which reference-pool images to keep, and a label for each.

Made to be as easy to read and as hard to abuse as safetensors: a fixed prefix, a small zstd-compressed
JSON header holding only what a receiver acts on, sections whose codec the header names, and a checksum;
every size is checked before anything is allocated. docs/FORMAT.md is the specification (layout, header
keys, each codec, the bounds every reader checks); this module is its reference implementation.

What the sender did to choose the selection (policy, teacher, candidates, timings) is not in the file:
`plada send` writes it to a JSON report beside the payload, so the bytes a budget pays for are the ones
a receiver needs, and the format need not change when the method does.

Drafts before 1.0 (versions 1-4, written by plada 0.x) are refused with a message naming them.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
import re
import secrets
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard as zstd

from plada import codec
from plada.errors import PayloadError, PladaError, reading

MAGIC = b"PLADA\x00\r\n"
FORMAT_VERSION = 0x0100  # 1.0, the one format: major in the high byte, minor in the low one
FORMAT = "1.0"
DRAFT_VERSIONS = (1, 2, 3, 4)  # plada 0.x's drafts: refused, with a message saying so
PRE_HEAD_VERSION = 0x0101  # plada 0.x wrote head payloads as "1.1" (2026-12-04..07): refused, saying so
MAX_HEADER_BYTES = 1 << 20
MAX_POOL_SIZE = 1 << 40
MAX_COUNT = 50_000_000
MAX_CLASSES = 65535
MAX_PAYLOAD_BYTES = 256 << 20
MAX_VARINT_BYTES = 6  # 6 * 7 = 42 bits covers every index and gap below 2**40
# What a reader decodes unless told otherwise. The format's own limits bound a hostile file's cost by what
# its header claims (a 3 KB gap list claiming 50M images costs ~2 GB and 15 s); these bound it by ~100 MB.
# A receiver that has checked the claims against its pool passes max_images=None.
DEFAULT_MAX_IMAGES = 2_000_000
BITMAP_BITS_PER_IMAGE = 64  # a bitmap index may span 64 pool images per image of the limit (16 MB at 2M)
BITMAP_MAX_BITS = 1 << 31  # a 256 MiB bitmap; bigger pools always use the gap list
BITMAP_RATIO = 64
BITMAP_SLACK = 64 << 10
# Receiver modes a header may name (plada.receiver implements them); an unknown one is refused, since the
# sender's forecast assumed it and a receiver that silently trained otherwise would miss that forecast.
LABEL_RECEIVERS = ("plain", "selftrain", "propagate")  # modes that need only the kept images and labels
RECEIVERS = (*LABEL_RECEIVERS, "head")  # head: the payload's linear head (its `head` section) labels the pool
HEAD_CODEC = "qhead-zstd"
HEAD_BITS = (4, 8)
MAX_HEAD_DIM = 4096
MAX_HEAD_WEIGHTS = 1 << 24  # classes x dim
_HEAD_KEYS = frozenset({"backbone", "res", "dim", "bits"})
_BACKBONE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,99}")
FORECAST_DIGITS = 4  # the header's forecast is rounded to this many decimals

# Raw-content zstd dictionary of the compressed header: the canonical header's keys and usual values in
# the order they appear, the most frequent last (zstd reaches the end of a dictionary cheapest). A 1 KB
# payload's header (fingerprint, ten class names, counts) then costs ~110 bytes instead of ~330 as JSON.
# Part of the format: changing one byte of it needs a new major version.
HEADER_DICT = "".join((
    '"groups":{"count":,"sha256":"',
    '"receiver":"propagate","receiver":"selftrain",',
    '{"codec":"bitmap-zstd","length":{"codec":"u16-zstd","length":',
    '"sections":[{"codec":"gap-zstd","length":,"name":"index"},{"codec":"u8-zstd","length":,"name":"labels"}]}',
    '"forecast":0.',
    '{"class_names":["',
    '"],"count":',
    ',"forecast":null,"groups":null,"pool_fingerprint":"',
    '","pool_size":',
    ',"receiver":"plain","sections":[{"codec":"ctx-range","length":',
    ',"name":"joint"}]}',
)).encode("utf-8")
HEADER_DICT_SHA256 = hashlib.sha256(HEADER_DICT).hexdigest()  # pinned by a test and by docs/FORMAT.md
_HEADER_ZDICT = zstd.ZstdCompressionDict(HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)

_PREFIX = struct.Struct("<8sHI")
_DIGEST_BYTES = 32
_MIN_BYTES = _PREFIX.size + _DIGEST_BYTES
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_WINDOW = 1 << 27  # largest zstd window a reader must provide (docs/FORMAT.md)
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_HEADER_KEYS = frozenset({"pool_fingerprint", "pool_size", "class_names", "count", "groups", "forecast",
                          "receiver", "sections"})
_SECTION_KEYS = frozenset({"name", "codec", "length"})
_INDEX_CODECS = ("gap-zstd", "bitmap-zstd")
JOINT_CODEC = "ctx-range"
CODECS = (*_INDEX_CODECS, JOINT_CODEC)
_GROUPS_KEYS = frozenset({"count", "sha256"})
_BITMAP_CHUNK = 1 << 16  # bitmap bytes unpacked at a time
_LABEL_CODECS = {"u8-zstd": np.dtype("<u1"), "u16-zstd": np.dtype("<u2")}
_VARINT_CHUNK = 1 << 20
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


def _label_dtype(n_classes: int) -> np.dtype:
    return _LABEL_CODECS["u8-zstd"] if n_classes <= 256 else _LABEL_CODECS["u16-zstd"]


def _label_codec(n_classes: int) -> str:
    return "u8-zstd" if n_classes <= 256 else "u16-zstd"


def _int_array(values: Any, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise PayloadError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size and (arr.dtype.kind not in "iu"):
        raise PayloadError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr


def _check_indices(values: Any, pool_size: int) -> np.ndarray:
    """Return the indices as read-only int64 after range and order checks, without wrapping uint64."""
    arr = _int_array(values, "indices")
    if arr.size:
        if int(arr.min()) < 0 or int(arr.max()) >= pool_size:
            raise PayloadError(f"index out of range: indices must lie in [0, {pool_size})")
        arr = arr.astype(np.int64)
        if arr.size > 1 and not bool(np.all(arr[1:] > arr[:-1])):
            raise PayloadError("indices not strictly increasing (must be sorted and unique)")
    else:
        arr = np.zeros(0, dtype=np.int64)
    return arr


def _check_forecast(value: Any) -> float | None:
    if value is None:
        return None
    bad = isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
    if bad or not 0 <= value <= 1:  # compared exactly: a 400-digit integer must not overflow float()
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "…"
        raise PayloadError(f"forecast must be null or a number in [0, 1], got {shown}")
    return round(float(value), FORECAST_DIGITS)


def _check_receiver(value: Any) -> str:
    if value not in RECEIVERS:
        raise PayloadError(f"unknown receiver mode {value!r} (this plada knows {', '.join(RECEIVERS)}): "
                           "a newer plada may be needed to receive this payload as its sender meant")
    return str(value)


@dataclass(frozen=True, eq=False)
class Head:
    """A linear classifier over the first ``dim`` whitened principal components of the pool's features
    under the public backbone ``backbone`` at ``res`` px (`plada.head` says how both sides compute them).

    Stored quantised, as sent: ``weights`` int8 (classes x dim) with |w| <= 2**(bits-1) - 1, one float16
    ``scales`` entry and one float16 ``bias`` entry per class; class c's logit is
    scale_c * (w_c . z) + bias_c. Constructing one validates it completely.
    """

    backbone: str
    res: int
    bits: int
    weights: np.ndarray
    scales: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not _BACKBONE_RE.fullmatch(self.backbone):
            raise PayloadError(f"head backbone must be a model name of 1..100 characters, got {self.backbone!r}")
        if not _is_int(self.res) or not 8 <= self.res <= 4096:
            raise PayloadError(f"head res must be an integer in 8..4096, got {self.res!r}")
        if not _is_int(self.bits) or self.bits not in HEAD_BITS:
            raise PayloadError(f"head bits must be one of {HEAD_BITS}, got {self.bits!r}")
        w = np.asarray(self.weights)
        if w.ndim != 2 or w.dtype.kind not in "iu" or not 1 <= w.shape[1] <= MAX_HEAD_DIM:
            raise PayloadError(f"head weights must be an integer matrix classes x dim, dim 1..{MAX_HEAD_DIM}")
        if w.size > MAX_HEAD_WEIGHTS:
            raise PayloadError(f"head has {w.size} weights; more than {MAX_HEAD_WEIGHTS} is unreasonable")
        top = 2 ** (self.bits - 1) - 1
        if w.size and int(np.abs(w.astype(np.int64)).max()) > top:
            raise PayloadError(f"head weight out of range for {self.bits} bits (|w| <= {top})")
        scales = np.asarray(self.scales, dtype=np.float16)
        bias = np.asarray(self.bias, dtype=np.float16)
        if scales.shape != (w.shape[0],) or bias.shape != (w.shape[0],):
            raise PayloadError("head scales and bias need one entry per class")
        if not (np.isfinite(scales).all() and (scales > 0).all() and np.isfinite(bias).all()):
            raise PayloadError("head scales must be finite and positive, its bias finite")
        for name, arr in (("weights", w.astype(np.int8)), ("scales", scales.copy()), ("bias", bias.copy())):
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        object.__setattr__(self, "res", int(self.res))
        object.__setattr__(self, "bits", int(self.bits))

    @property
    def dim(self) -> int:
        return int(self.weights.shape[1])

    def dequantised(self) -> tuple[np.ndarray, np.ndarray]:
        """(weight, bias) as float32, exactly what every receiver computes with."""
        return (self.weights.astype(np.float32) * self.scales.astype(np.float32)[:, None],
                self.bias.astype(np.float32))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Head):
            return NotImplemented
        return (self.backbone, self.res, self.bits) == (other.backbone, other.res, other.bits) and all(
            np.array_equal(getattr(self, n), getattr(other, n)) for n in ("weights", "scales", "bias"))

    __hash__ = None  # type: ignore[assignment]


def _head_raw(h: Head) -> bytes:
    """The head section before Zstd: weights row-major (int8, or 4-bit offset by 7 and packed two per byte,
    low nibble first, a zero nibble padding an odd count), then the float16 scales, then the float16 bias."""
    if h.bits == 8:
        body = h.weights.tobytes()
    else:
        u = (h.weights.ravel().astype(np.int16) + 7).astype(np.uint8)
        u = np.concatenate([u, np.zeros(len(u) % 2, np.uint8)])
        body = (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()
    return body + h.scales.astype("<f2").tobytes() + h.bias.astype("<f2").tobytes()


def _head_raw_size(n_classes: int, dim: int, bits: int) -> int:
    return (n_classes * dim if bits == 8 else (n_classes * dim + 1) // 2) + 4 * n_classes


def _head_from_raw(raw: bytes, meta: dict, n_classes: int) -> Head:
    dim, bits = meta["dim"], meta["bits"]
    nw = n_classes * dim
    wbytes = len(raw) - 4 * n_classes
    if bits == 8:
        w = np.frombuffer(raw[:wbytes], dtype=np.int8)
    else:
        u = np.frombuffer(raw[:wbytes], dtype=np.uint8)
        nib = np.empty(2 * len(u), dtype=np.uint8)
        nib[0::2], nib[1::2] = u & 15, u >> 4
        if nw % 2 and nib[-1] != 0:
            raise PayloadError("head section's padding nibble is not 0")
        nib = nib[:nw]
        if nib.size and int(nib.max()) > 14:
            raise PayloadError("head section holds a 4-bit weight out of range (nibble 15)")
        w = nib.astype(np.int16) - 7
    scales = np.frombuffer(raw[wbytes:wbytes + 2 * n_classes], dtype="<f2")
    bias = np.frombuffer(raw[wbytes + 2 * n_classes:], dtype="<f2")
    return Head(meta["backbone"], meta["res"], bits, w.reshape(n_classes, dim), scales, bias)


@dataclass(frozen=True, eq=False)
class Payload:
    """A kept subset of the shared pool with labels; constructing one validates it completely.

    Arrays are stored as read-only copies (indices int64, labels uint8 or uint16 by class count) so a
    validated payload cannot drift into an unencodable state. ``forecast`` is the sender's expected test
    accuracy for a receiver in mode ``receiver`` (None when it made none); it is stored rounded to
    `FORECAST_DIGITS` decimals, so a payload equals its decoded copy. ``head`` (a `head` section) is present
    exactly when ``receiver`` is "head"; such a payload may keep no images at all.
    """

    pool_fingerprint: str
    pool_size: int
    class_names: tuple[str, ...]
    indices: np.ndarray
    labels: np.ndarray
    forecast: float | None = None
    receiver: str = "plain"
    head: Head | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.pool_size):
            raise PayloadError(f"pool_size must be an integer, got {type(self.pool_size).__name__}")
        object.__setattr__(self, "pool_size", int(self.pool_size))
        if isinstance(self.class_names, (str, bytes)) or not hasattr(self.class_names, "__iter__"):
            raise PayloadError("class_names must be a sequence of strings")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        self._check_scalars()
        indices = _check_indices(self.indices, self.pool_size).copy()
        if indices.size > MAX_COUNT:
            raise PayloadError(f"payload keeps {indices.size} images; more than {MAX_COUNT} is unreasonable")
        labels = _int_array(self.labels, "labels")
        if labels.shape != indices.shape:
            raise PayloadError(f"labels length {labels.size} != indices length {indices.size}")
        n_classes = len(self.class_names)
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise PayloadError(f"label out of range: labels must lie in [0, {n_classes})")
        labels = labels.astype(_label_dtype(n_classes))  # astype copies
        indices.setflags(write=False)
        labels.setflags(write=False)
        object.__setattr__(self, "indices", indices)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "forecast", _check_forecast(self.forecast))
        object.__setattr__(self, "receiver", _check_receiver(self.receiver))
        if self.head is not None and not isinstance(self.head, Head):
            raise PayloadError(f"head must be a payload.Head, got {type(self.head).__name__}")
        if (self.head is not None) != (self.receiver == "head"):
            raise PayloadError("a payload carries a head exactly when its receiver mode is 'head'")
        if self.head is not None and self.head.weights.shape[0] != n_classes:
            raise PayloadError(f"head has {self.head.weights.shape[0]} class rows, the payload {n_classes} classes")

    def _check_scalars(self) -> None:
        fp = self.pool_fingerprint
        if not isinstance(fp, str) or not _FINGERPRINT_RE.fullmatch(fp):
            raise PayloadError("pool_fingerprint must be 64 lowercase hex characters (sha256)")
        if not 0 < self.pool_size <= MAX_POOL_SIZE:
            raise PayloadError(f"pool_size {self.pool_size} out of range (must be 1..2**40)")
        n = len(self.class_names)
        if not 1 <= n <= MAX_CLASSES:
            raise PayloadError(f"need 1..{MAX_CLASSES} class names, got {n}")
        for name in self.class_names:
            if not isinstance(name, str) or not name:
                raise PayloadError(f"class names must be non-empty strings, got {name!r}")
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise PayloadError(f"class name {name!r} is not valid Unicode text") from None
        if len(set(self.class_names)) != n:
            raise PayloadError("class names must be unique")

    @property
    def count(self) -> int:
        return int(self.indices.size)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Payload):
            return NotImplemented
        return (
            self.pool_fingerprint == other.pool_fingerprint
            and self.pool_size == other.pool_size
            and self.class_names == other.class_names
            and np.array_equal(self.indices, other.indices)
            and self.labels.dtype == other.labels.dtype
            and np.array_equal(self.labels, other.labels)
            and self.forecast == other.forecast
            and self.receiver == other.receiver
            and (self.head == other.head if self.head is not None and other.head is not None
                 else self.head is other.head)
        )

    __hash__ = None  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------- codecs


def _compress(raw: bytes, level: int) -> bytes:
    return zstd.ZstdCompressor(level=level, write_content_size=True, threads=0).compress(raw)


def _decompress(blob: bytes, lo: int, hi: int, what: str, dict_data: zstd.ZstdCompressionDict | None = None) -> bytes:
    """Inflate one frame only if it declares a size in [lo, hi], so a bomb costs nothing."""
    if len(blob) < 4 or blob[:4] != _ZSTD_MAGIC:
        raise PayloadError(f"{what} section is not a zstd frame")
    try:
        declared = zstd.get_frame_parameters(blob).content_size
    except zstd.ZstdError as e:
        raise PayloadError(f"{what} section has a bad zstd frame header: {_one_line(e)}") from None
    if declared == zstd.CONTENTSIZE_UNKNOWN:
        raise PayloadError(f"{what} section's zstd frame does not declare its decompressed size")
    if zstd.get_frame_parameters(blob).window_size > _MAX_WINDOW:  # one-shot inflation would not check it
        raise PayloadError(f"{what} section's zstd frame needs a window over {_MAX_WINDOW} bytes")
    if not lo <= declared <= hi:
        want = f"{lo}" if lo == hi else f"{lo}..{hi}"
        raise PayloadError(f"{what} section declares {declared} decompressed bytes, expected {want}")
    try:
        raw = zstd.ZstdDecompressor(max_window_size=_MAX_WINDOW, dict_data=dict_data).decompress(
            blob, max_output_size=hi, allow_extra_data=False
        )
    except zstd.ZstdError as e:
        raise PayloadError(f"{what} section is corrupt: {_one_line(e)}") from None
    if len(raw) != declared:
        raise PayloadError(f"{what} section decompressed to {len(raw)} bytes, frame declared {declared}")
    return raw


def _varint_encode(values: np.ndarray) -> bytes:
    """LEB128 for uint64 values < 2**42, vectorised in chunks so memory stays ~10x the chunk."""
    parts = []
    shifts = np.arange(MAX_VARINT_BYTES, dtype=np.uint64) * np.uint64(7)
    for start in range(0, values.size, _VARINT_CHUNK):
        v = values[start : start + _VARINT_CHUNK].astype(np.uint64)
        nbytes = np.ones(v.size, dtype=np.int64)
        for j in range(1, MAX_VARINT_BYTES):
            nbytes += v >= np.uint64(1 << (7 * j))
        groups = ((v[:, None] >> shifts[None, :]) & np.uint64(0x7F)).astype(np.uint8)
        pos = np.arange(MAX_VARINT_BYTES)[None, :]
        groups[pos < (nbytes[:, None] - 1)] |= 0x80
        parts.append(groups[pos < nbytes[:, None]].tobytes())
    return b"".join(parts)


def _varint_decode(raw: bytes, count: int) -> np.ndarray:
    """Inverse of `_varint_encode`; rejects anything but exactly `count` canonical varints."""
    b = np.frombuffer(raw, dtype=np.uint8)
    if count == 0:
        if b.size:
            raise PayloadError("index section holds data but count is 0")
        return np.zeros(0, dtype=np.uint64)
    ends = np.flatnonzero(b < 0x80)
    if ends.size != count or ends[-1] != b.size - 1:
        raise PayloadError(
            f"index section holds {ends.size} varints (or a cut one), header says count={count}"
        )
    starts = np.empty_like(ends)
    starts[0] = 0
    starts[1:] = ends[:-1] + 1
    lengths = ends - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise PayloadError(f"index section has a varint longer than {MAX_VARINT_BYTES} bytes")
    if bool(np.any((lengths > 1) & (b[ends] == 0))):
        raise PayloadError("index section has a non-canonical (zero-padded) varint")
    values = np.zeros(count, dtype=np.uint64)
    for j in range(MAX_VARINT_BYTES):
        m = lengths > j
        if not m.any():
            break
        values[m] |= (b[starts[m] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return values


def _gap_raw(indices: np.ndarray) -> bytes:
    if indices.size == 0:
        return b""
    gaps = np.empty(indices.size, dtype=np.int64)
    gaps[0] = indices[0]
    np.subtract(indices[1:], indices[:-1] + 1, out=gaps[1:])
    return _varint_encode(gaps.astype(np.uint64))


def _gap_indices(raw: bytes, count: int, pool_size: int) -> np.ndarray:
    gaps = _varint_decode(raw, count)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    # Every real gap is < N, and the exact int sum must stay < N; the float pre-check keeps a hostile
    # list of 2**42-sized gaps from overflowing the int64 cumsum.
    if gaps.max() >= pool_size or float(gaps.sum(dtype=np.float64)) + count > 2.0**62:
        raise PayloadError(f"index out of range: decoded indices exceed pool_size {pool_size}")
    indices = np.cumsum(gaps.astype(np.int64)) + np.arange(count, dtype=np.int64)
    if indices[-1] >= pool_size:
        raise PayloadError(f"index out of range: decoded indices exceed pool_size {pool_size}")
    return indices


def _bitmap_raw(indices: np.ndarray, pool_size: int) -> bytes:
    bitmap = np.zeros((pool_size + 7) // 8, dtype=np.uint8)
    if indices.size:
        byte = indices >> 3
        bits = np.left_shift(1, indices & 7).astype(np.uint8)
        starts = np.flatnonzero(np.r_[True, byte[1:] != byte[:-1]])
        # Indices are sorted and unique, so bits within one byte are distinct and add == or.
        bitmap[byte[starts]] = np.add.reduceat(bits, starts)
    return bitmap.tobytes()


def _bitmap_indices(raw: bytes, count: int, pool_size: int) -> np.ndarray:
    b = np.frombuffer(raw, dtype=np.uint8)
    tail = pool_size % 8
    if tail and b[-1] >> tail:
        raise PayloadError(f"index out of range: bitmap sets padding bits beyond pool_size {pool_size}")
    # Chunked, so a bitmap costs its output (8 bytes per kept index) plus one chunk's scratch, not the
    # ~80 bytes per non-zero byte of unpacking it whole (a 1.5 KB hostile file used to cost 660 MiB).
    ones = sum(int(_POPCOUNT[b[a : a + _BITMAP_CHUNK]].sum()) for a in range(0, b.size, _BITMAP_CHUNK))
    if ones != count:
        raise PayloadError(f"index bitmap has {ones} bits set, header says count={count}")
    out = np.empty(count, dtype=np.int64)
    filled = 0
    for a in range(0, b.size, _BITMAP_CHUNK):
        chunk = b[a : a + _BITMAP_CHUNK]
        nz = np.flatnonzero(chunk)
        bits = np.unpackbits(chunk[nz][:, None], axis=1, bitorder="little").astype(bool)
        pos = (nz[:, None].astype(np.int64) + a) * 8 + np.arange(8, dtype=np.int64)[None, :]
        got = pos[bits]
        out[filled : filled + got.size] = got
        filled += got.size
    return out


def _bitmap_allowed(pool_size: int, gap_limit: int) -> bool:
    return pool_size <= BITMAP_MAX_BITS and (pool_size + 7) // 8 <= BITMAP_RATIO * gap_limit + BITMAP_SLACK


def _check_level(level: int) -> int:
    if not _is_int(level) or not 1 <= level <= zstd.MAX_COMPRESSION_LEVEL:
        raise PladaError(f"zstd level must be an integer 1..{zstd.MAX_COMPRESSION_LEVEL}, got {level!r}")
    return int(level)


def _encode_index(indices: np.ndarray, pool_size: int, level: int, allowed: frozenset[str]) -> tuple[str, bytes] | None:
    gap_raw = _gap_raw(indices)
    best = ("gap-zstd", _compress(gap_raw, level)) if "gap-zstd" in allowed else None
    if "bitmap-zstd" in allowed and _bitmap_allowed(pool_size, len(gap_raw)):
        bitmap = _compress(_bitmap_raw(indices, pool_size), level)
        if best is None or len(bitmap) < len(best[1]):
            best = ("bitmap-zstd", bitmap)
    return best


# ---------------------------------------------------------------------------------------------- encode


def _check_codecs(codecs: Any) -> frozenset[str]:
    if codecs is None:
        return frozenset(CODECS)
    if isinstance(codecs, str) or not hasattr(codecs, "__iter__"):
        raise PladaError(f"codecs must be a collection of codec names ({', '.join(CODECS)}), got {codecs!r}")
    allowed = frozenset(codecs)
    unknown = sorted(allowed - set(CODECS))
    if unknown or not allowed:
        raise PladaError(f"codecs must name some of {', '.join(CODECS)}; got {sorted(allowed)!r}")
    return allowed


def _compress_header(header_bytes: bytes, level: int) -> bytes:
    return zstd.ZstdCompressor(
        level=level, dict_data=_HEADER_ZDICT, write_content_size=True, write_dict_id=False, threads=0
    ).compress(header_bytes)


def _assemble(header: dict, blobs: list[bytes], level: int = 19) -> bytes:
    """Prefix, compressed canonical header, sections, checksum."""
    header_bytes = _dumps(header).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise PayloadError(
            f"payload header too large: {len(header_bytes)} bytes of JSON (limit {MAX_HEADER_BYTES}); "
            "shorten the class names"
        )
    packed = _compress_header(header_bytes, level)
    body = b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION, len(packed)), packed, *blobs])
    if len(body) + _DIGEST_BYTES > MAX_PAYLOAD_BYTES:
        raise PayloadError(
            f"payload too large: {len(body) + _DIGEST_BYTES} bytes (limit {MAX_PAYLOAD_BYTES})"
        )
    return body + hashlib.sha256(body).digest()


def _header(p: Payload, groups: dict | None, sections: list[dict]) -> dict:
    extra = {}
    if p.head is not None:
        extra = {"head": {"backbone": p.head.backbone, "res": p.head.res, "dim": p.head.dim, "bits": p.head.bits}}
    return {
        **extra,
        "pool_fingerprint": p.pool_fingerprint,
        "pool_size": p.pool_size,
        "class_names": list(p.class_names),
        "count": p.count,
        "groups": groups,
        "forecast": p.forecast,
        "receiver": p.receiver,
        "sections": sections,
    }


def _encode_zstd(p: Payload, level: int, allowed: frozenset[str]) -> bytes | None:
    index = _encode_index(p.indices, p.pool_size, level, allowed)
    if index is None:
        return None
    index_codec, index_blob = index
    labels_codec = _label_codec(len(p.class_names))
    labels_blob = _compress(p.labels.astype(_LABEL_CODECS[labels_codec]).tobytes(), level)
    sections = [
        {"name": "index", "codec": index_codec, "length": len(index_blob)},
        {"name": "labels", "codec": labels_codec, "length": len(labels_blob)},
    ]
    blobs = [index_blob, labels_blob, *_head_blob(p, level)]
    return _assemble(_header(p, None, sections + _head_entry(blobs[2:])), blobs, level)


def _head_blob(p: Payload, level: int) -> list[bytes]:
    return [] if p.head is None else [_compress(_head_raw(p.head), level)]


def _head_entry(blobs: list[bytes]) -> list[dict]:
    return [{"name": "head", "codec": HEAD_CODEC, "length": len(b)} for b in blobs]


def _joint_possible(p: Payload) -> bool:
    return p.pool_size <= codec.MAX_POOL and p.count <= codec.MAX_COUNT


def _encode_joint(p: Payload, groups: Any, level: int) -> bytes:
    gr = codec.grouping(groups, p.pool_size)
    blob = codec.encode(p.indices, p.labels, p.pool_size, len(p.class_names), gr)
    # A one-group partition codes exactly like no groups, so only a real grouping binds the payload to it.
    named = None if gr.count == 1 else {"count": gr.count, "sha256": gr.digest}
    blobs = [blob, *_head_blob(p, level)]
    sections = [{"name": "joint", "codec": JOINT_CODEC, "length": len(blob)}, *_head_entry(blobs[1:])]
    return _assemble(_header(p, named, sections), blobs, level)


def encode(p: Payload, level: int = 19, *, groups: Any = None, codecs: Any = None) -> bytes:
    """Serialise deterministically with the smallest codec; refuses anything `decode` would refuse.

    ``groups`` is the pool's group id per image (``Pool.groups()[0]``, its folders); the joint codec
    then codes per group, and a payload that uses them can only be decoded with the same grouping.
    Groups only act on the joint section, which pools over 2**31 images cannot use (`codec.MAX_POOL`).
    ``codecs`` restricts the candidates (default: all of `CODECS`); a tie goes to the zstd sections.
    ``level`` is the zstd level of the zstd sections and of the header.
    """
    if not isinstance(p, Payload):
        raise PladaError(f"encode() needs a Payload, got {type(p).__name__}")
    level = _check_level(level)
    allowed = _check_codecs(codecs)
    if groups is not None and p.pool_size <= codec.MAX_POOL:
        groups = codec.grouping(groups, p.pool_size)  # check it even when a zstd codec wins
    best = _encode_zstd(p, level, allowed)
    if JOINT_CODEC in allowed and _joint_possible(p):
        # Also without the groups: binding a payload to a grouping costs its header ~100 bytes (count and
        # digest), more than the grouping saves on a selection of a few images.
        for g in (groups, None) if groups is not None else (None,):
            joint = _encode_joint(p, g, level)
            if best is None or len(joint) < len(best):
                best = joint
    if best is None:
        raise PladaError(f"none of the codecs {sorted(allowed)} can encode this payload")
    return best


# ---------------------------------------------------------------------------------------------- decode


def _reject_constant(name: str) -> None:
    raise PayloadError(f"payload header contains {name}, which is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise PayloadError("payload header has a duplicated JSON key")
    return out


def _header_int(header: dict, key: str) -> int:
    value = header[key]
    if not _is_int(value):
        raise PayloadError(f"payload header field {key!r} must be an integer, got {type(value).__name__}")
    return value


def _check_sections(header: dict) -> None:
    """The section list: [index, labels] with zstd codecs and no groups, or [joint] with the range codec."""
    sections = header["sections"]
    has_head = "head" in header  # receiver mode head: the same sections, then the head's
    if not isinstance(sections, list) or len(sections) not in ((2, 3) if has_head else (1, 2)):
        raise PayloadError("payload header field 'sections' must list [index, labels] or [joint]"
                           + (", then [head]" if has_head else ""))
    for sec in sections:
        if not isinstance(sec, dict) or set(sec) != _SECTION_KEYS:
            raise PayloadError(f"payload section entry must have exactly the keys {sorted(_SECTION_KEYS)}")
        length = sec["length"]
        if not _is_int(length) or length < 0:
            raise PayloadError(f"{sec['name']!r} section length must be a non-negative integer, got {length!r}")
    names = [sec["name"] for sec in sections]
    if has_head:
        if names[-1] != "head" or sections[-1]["codec"] != HEAD_CODEC:
            raise PayloadError(f"a head payload's last section must be 'head' with codec {HEAD_CODEC!r}")
        names = names[:-1]
    if names not in (["index", "labels"], ["joint"]):
        raise PayloadError(f"payload sections must be ['index', 'labels'] or ['joint'], got {names!r}")
    if names == ["joint"]:
        _check_joint_header(header)
        return
    if header["groups"] is not None:
        raise PayloadError("payload header names pool groups, but only a joint section is coded per group")
    index_codec, labels_codec = sections[0]["codec"], sections[1]["codec"]
    if index_codec not in _INDEX_CODECS:
        raise PayloadError(f"unknown index codec {index_codec!r} (known: {', '.join(_INDEX_CODECS)})")
    want = _label_codec(len(header["class_names"]))
    if labels_codec != want:
        raise PayloadError(
            f"labels codec {labels_codec!r} does not fit {len(header['class_names'])} classes (expected {want!r})"
        )


def _check_joint_header(header: dict) -> None:
    """One joint section, and the grouping (if any) that the decoder must reproduce."""
    pool_size, count = header["pool_size"], header["count"]
    if pool_size > codec.MAX_POOL or count > codec.MAX_COUNT:
        raise PayloadError(
            f"joint codec not allowed for pool_size {pool_size} with count {count} "
            f"(limits {codec.MAX_POOL} and {codec.MAX_COUNT})"
        )
    groups = header["groups"]
    if groups is not None:
        if not isinstance(groups, dict) or set(groups) != _GROUPS_KEYS:
            raise PayloadError(
                f"payload header field 'groups' must be null or have exactly the keys {sorted(_GROUPS_KEYS)}"
            )
        g = groups["count"]
        if not _is_int(g) or not 2 <= g <= pool_size:
            raise PayloadError(f"payload header 'groups' count {g!r} out of range (2..pool_size)")
        if not isinstance(groups["sha256"], str) or not _FINGERPRINT_RE.fullmatch(groups["sha256"]):
            raise PayloadError("payload header 'groups' sha256 must be 64 lowercase hex characters")
    codec_id = header["sections"][0]["codec"]
    if codec_id != JOINT_CODEC:
        raise PayloadError(f"unknown joint codec {codec_id!r} (known: {JOINT_CODEC})")


def _check_head_meta(header: dict) -> None:
    meta = header["head"]
    if not isinstance(meta, dict) or set(meta) != _HEAD_KEYS:
        raise PayloadError(f"payload header field 'head' must have exactly the keys {sorted(_HEAD_KEYS)}")
    if not isinstance(meta["backbone"], str) or not _BACKBONE_RE.fullmatch(meta["backbone"]):
        raise PayloadError("payload header 'head' backbone must be a model name of 1..100 characters")
    for key, lo, hi in (("res", 8, 4096), ("dim", 1, MAX_HEAD_DIM)):
        if not _is_int(meta[key]) or not lo <= meta[key] <= hi:
            raise PayloadError(f"payload header 'head' {key} must be an integer in {lo}..{hi}, got {meta[key]!r}")
    if not _is_int(meta["bits"]) or meta["bits"] not in HEAD_BITS:
        raise PayloadError(f"payload header 'head' bits must be one of {HEAD_BITS}, got {meta['bits']!r}")
    if meta["dim"] * len(header["class_names"]) > MAX_HEAD_WEIGHTS:
        raise PayloadError(f"payload header 'head' claims more than {MAX_HEAD_WEIGHTS} weights")
    if header["receiver"] != "head":
        raise PayloadError("a payload with a head must name receiver mode 'head'")


def _parse_header(raw: bytes) -> dict:
    """Parse and check an inflated header completely: keys, types, ranges, sections."""
    try:
        header = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant
        )
    except UnicodeDecodeError:
        raise PayloadError("payload header is not valid UTF-8") from None
    except RecursionError:
        raise PayloadError("payload header JSON is nested too deeply") from None
    except ValueError as e:
        raise PayloadError(f"payload header is not valid JSON: {_one_line(e)}") from None
    if not isinstance(header, dict):
        raise PayloadError("payload header must be a JSON object")
    # `head` is there exactly when the receiver mode is head: one format, the section list says the rest.
    keys = _HEADER_KEYS | {"head"} if header.get("receiver") == "head" else _HEADER_KEYS
    if set(header) != keys:
        missing = sorted(keys - set(header))
        extra = sorted(set(header) - keys)
        raise PayloadError(f"payload header keys wrong: missing {missing}, unexpected {extra}")
    fp = header["pool_fingerprint"]
    if not isinstance(fp, str) or not _FINGERPRINT_RE.fullmatch(fp):
        raise PayloadError("payload header 'pool_fingerprint' must be 64 lowercase hex characters (sha256)")
    pool_size = _header_int(header, "pool_size")
    count = _header_int(header, "count")
    if not 0 < pool_size <= MAX_POOL_SIZE:
        raise PayloadError(f"pool_size {pool_size} out of range (must be 1..2**40)")
    if count < 0 or count > pool_size:
        raise PayloadError(f"count {count} out of range for pool_size {pool_size}")
    if count > MAX_COUNT:
        raise PayloadError(f"payload claims {count} kept images; more than {MAX_COUNT} is unreasonable")
    names = header["class_names"]
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_CLASSES:
        raise PayloadError(f"payload header field 'class_names' must be a list of 1..{MAX_CLASSES} strings")
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise PayloadError("payload header 'class_names' must be distinct non-empty strings")
    header["forecast"] = _check_forecast(header["forecast"])
    _check_receiver(header["receiver"])
    if header["receiver"] == "head":
        _check_head_meta(header)
    _check_sections(header)
    return header


def _checked_header(data: bytes) -> tuple[dict, int, bytes, bytes]:
    """(header, stored header length, body, digest): every header and length check, no section inflated."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    total = len(data)
    if total < len(MAGIC):
        if MAGIC.startswith(data):
            raise PayloadError(f"payload truncated: {total} bytes, a payload is at least {_MIN_BYTES}")
        raise PayloadError("not a .plada payload (bad magic)")
    if data[: len(MAGIC)] != MAGIC:
        raise PayloadError("not a .plada payload (bad magic)")
    if total < _PREFIX.size:
        raise PayloadError(f"payload truncated: {total} bytes, a payload is at least {_MIN_BYTES}")
    _, version, header_len = _PREFIX.unpack_from(data)
    if version in DRAFT_VERSIONS:
        raise PayloadError(f"payload is in draft format {version} of plada 0.x; this plada reads format 1.0 "
                           "(ask its sender to send it again)")
    if version == PRE_HEAD_VERSION:
        raise PayloadError("payload is in plada 0.x's pre-release format 1.1 (a head payload); this plada reads "
                           "format 1.0 (ask its sender to send it again)")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported payload format {version >> 8}.{version & 0xFF} "
                           "(this plada reads format 1.0)")
    if total < _MIN_BYTES:
        raise PayloadError(f"payload truncated: {total} bytes, a payload is at least {_MIN_BYTES}")
    if total > MAX_PAYLOAD_BYTES:
        raise PayloadError(f"payload too large: {total} bytes (limit {MAX_PAYLOAD_BYTES})")
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise PayloadError("payload checksum mismatch (corrupted or truncated)")
    # The checksum only proves the sender meant these bytes; everything below distrusts them.
    if header_len > MAX_HEADER_BYTES:
        raise PayloadError(f"payload header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if _PREFIX.size + header_len > len(body):
        raise PayloadError(f"payload truncated: header length {header_len} runs past the end of the file")
    # Bounded like a section: a frame that does not declare a size of at most 1 MiB is never inflated.
    stored = _decompress(body[_PREFIX.size : _PREFIX.size + header_len], 0, MAX_HEADER_BYTES, "header",
                         _HEADER_ZDICT)
    header = _parse_header(stored)
    _section_lengths(header, header_len, body)
    return header, header_len, body, digest


def peek_header(data: bytes) -> dict:
    """The header after every check short of inflating a section: refuse another pool's payload cheaply."""
    try:
        return _checked_header(data)[0]
    except PayloadError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, zstd.ZstdError) as e:
        raise PayloadError(f"malformed payload: {_one_line(e)}") from None


def _check_max_images(max_images: Any) -> int | None:
    if max_images is None:
        return None
    if not _is_int(max_images) or max_images < 0:
        raise PladaError(f"max_images must be a non-negative integer or None, got {max_images!r}")
    return int(max_images)


def _check_work(header: dict, max_images: int | None) -> None:
    """Refuse, before inflating anything, a payload whose claims would cost more than `max_images` allows."""
    if max_images is None:
        return
    count, pool_size = header["count"], header["pool_size"]
    if count > max_images:
        raise PayloadError(
            f"payload claims {count} kept images, more than the {max_images} decoded without being told to "
            f"(pass --trust, or --max-images {count}, if you trust its sender)"
        )
    bitmap = header["sections"][0]["codec"] == "bitmap-zstd" and _bitmap_allowed(pool_size, MAX_VARINT_BYTES * count)
    if bitmap and pool_size > BITMAP_BITS_PER_IMAGE * max_images:  # (a bitmap the format forbids: its own error)
        need = -(-pool_size // BITMAP_BITS_PER_IMAGE)
        raise PayloadError(
            f"payload's bitmap index spans a pool of {pool_size} images, more than the "
            f"{BITMAP_BITS_PER_IMAGE * max_images} decoded without being told to "
            f"(pass --trust, or --max-images {need}, if you trust its sender)"
        )


def _section_lengths(header: dict, header_len: int, body: bytes) -> int:
    available = len(body) - _PREFIX.size - header_len
    declared = sum(sec["length"] for sec in header["sections"])
    if declared != available:
        kind = "truncated" if declared > available else "has trailing bytes"
        raise PayloadError(f"payload {kind}: header declares {declared} section bytes, file has {available}")
    return available


def _info(header: dict, total: int, header_len: int, digest: bytes, sections: list[dict], decoded: bool) -> dict:
    names = header["class_names"]
    return {
        "format": FORMAT,
        "total_bytes": total,
        "header_bytes": header_len,
        "checksum_sha256": digest.hex(),
        "pool_fingerprint": header["pool_fingerprint"],
        "pool_size": header["pool_size"],
        "count": header["count"],
        "class_count": len(names),
        "class_names": list(names),
        "forecast": header["forecast"],
        "receiver": header["receiver"],
        "groups": header["groups"],
        "head": header.get("head"),
        "sections": sections,
        "decoded": decoded,
    }


def _declared_size(blob: bytes) -> int | None:
    """A zstd section's decompressed size as its frame header states it, read without inflating anything."""
    try:
        size = zstd.get_frame_parameters(blob).content_size
    except zstd.ZstdError:
        return None
    return None if size == zstd.CONTENTSIZE_UNKNOWN else int(size)


def _undecoded(data: bytes, note: str) -> dict:
    """What describe says of a payload it will not decode: the checked header and each section's size."""
    header, header_len, body, digest = _checked_header(data)
    start, sections = _PREFIX.size + header_len, []
    for sec in header["sections"]:
        blob = body[start : start + sec["length"]]
        start += sec["length"]
        raw = len(blob) if sec["codec"] == JOINT_CODEC else _declared_size(blob)
        sections.append({"name": sec["name"], "codec": sec["codec"], "entries": header["count"],
                         "raw_bytes": raw, "stored_bytes": sec["length"]})
    info = _info(header, len(data), header_len, digest, sections, decoded=False)
    info["note"] = note
    return info


def _decode(data: bytes, groups: Any = None, max_images: int | None = DEFAULT_MAX_IMAGES) -> tuple[Payload, dict]:
    header, header_len, body, digest = _checked_header(data)
    pool_size, count = header["pool_size"], header["count"]
    _check_work(header, max_images)
    start = _PREFIX.size + header_len
    sections: list[dict] = []
    if header["sections"][0]["name"] == "joint":
        blob = body[start : start + header["sections"][0]["length"]]
        indices, labels = _decode_joint(header, blob, groups)
        sections.append({"name": "joint", "codec": JOINT_CODEC, "entries": count, "raw_bytes": len(blob),
                         "stored_bytes": len(blob)})
    else:
        sec_index, sec_labels = header["sections"][:2]
        index_blob = body[start : start + sec_index["length"]]
        labels_blob = body[start + sec_index["length"] : start + sec_index["length"] + sec_labels["length"]]
        if sec_index["codec"] == "gap-zstd":
            index_raw = _decompress(index_blob, count, MAX_VARINT_BYTES * count, "index")
            indices = _gap_indices(index_raw, count, pool_size)
        else:
            if not _bitmap_allowed(pool_size, MAX_VARINT_BYTES * count):
                raise PayloadError(f"bitmap index codec not allowed for pool_size {pool_size} with count {count}")
            nbytes = (pool_size + 7) // 8
            index_raw = _decompress(index_blob, nbytes, nbytes, "index")
            indices = _bitmap_indices(index_raw, count, pool_size)
        dtype = _LABEL_CODECS[sec_labels["codec"]]
        labels_raw = _decompress(labels_blob, count * dtype.itemsize, count * dtype.itemsize, "labels")
        labels = np.frombuffer(labels_raw, dtype=dtype)
        for sec, raw in ((sec_index, index_raw), (sec_labels, labels_raw)):
            sections.append({"name": sec["name"], "codec": sec["codec"], "entries": count, "raw_bytes": len(raw),
                             "stored_bytes": sec["length"]})
    head = None
    if "head" in header:
        meta, sec = header["head"], header["sections"][-1]
        size = _head_raw_size(len(header["class_names"]), meta["dim"], meta["bits"])
        raw = _decompress(body[len(body) - sec["length"]:], size, size, "head")
        head = _head_from_raw(raw, meta, len(header["class_names"]))
        sections.append({"name": "head", "codec": HEAD_CODEC, "entries": head.weights.size, "raw_bytes": size,
                         "stored_bytes": sec["length"]})
    payload = Payload(header["pool_fingerprint"], pool_size, tuple(header["class_names"]), indices, labels,
                      forecast=header["forecast"], receiver=header["receiver"], head=head)
    return payload, _info(header, len(data), header_len, digest, sections, decoded=True)


def _decode_joint(header: dict, blob: bytes, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    pool_size, count = header["pool_size"], header["count"]
    want = header["groups"]
    if want is None:
        grouping = codec.grouping(None, pool_size)
    else:
        if groups is None:
            raise PayloadError(
                f"this payload was coded per folder of its pool ({want['count']} groups): decoding it needs "
                "the pool (plada inspect --pool POOL; in Python, decode(data, groups=pool.groups()[0]))"
            )
        grouping = codec.grouping(groups, pool_size)
        if grouping.count != want["count"] or grouping.digest != want["sha256"]:
            raise PayloadError(
                f"this payload was coded with a different grouping of the pool ({want['count']} groups, "
                f"sha256 {want['sha256'][:16]}…) than the one given ({grouping.count} groups, "
                f"sha256 {grouping.digest[:16]}…): sender and receiver must group the pool alike"
            )
    return codec.decode(blob, count, pool_size, len(header["class_names"]), grouping)


def decode(data: bytes, groups: Any = None, *, max_images: int | None = DEFAULT_MAX_IMAGES) -> Payload:
    """Parse untrusted bytes; any defect, accidental or hostile, becomes a one-line PayloadError.

    ``groups`` is the receiving pool's group id per image (``Pool.groups()[0]``); only payloads
    coded per group need it, and they refuse to decode without it or with a different grouping.
    ``max_images`` bounds the work a header can ask for (kept images, and a bitmap's span of
    `BITMAP_BITS_PER_IMAGE` pool images per image), checked before anything is inflated; None lifts it,
    for a caller that has already checked the header's claims against its own pool.
    """
    max_images = _check_max_images(max_images)
    try:
        return _decode(data, groups, max_images)[0]
    except PayloadError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, zstd.ZstdError) as e:
        # Backstop only: every known defect has its own message above.
        raise PayloadError(f"malformed payload: {_one_line(e)}") from None


def describe(data: bytes, groups: Any = None, *, max_images: int | None = DEFAULT_MAX_IMAGES,
             header_only: bool = False) -> dict:
    """What `plada inspect` shows; decodes fully so it never describes a payload that would not load.

    Bounded like `decode` (``max_images``). Where decoding is not asked for (``header_only``) or not
    possible (a payload coded per pool folder, given no ``groups``) it still reports the checked header and
    each section's stored size, with ``decoded`` False and a ``note`` saying why; nothing is inflated then.
    """
    max_images = _check_max_images(max_images)
    try:
        if header_only:
            return _undecoded(data, "sections not decoded (header only)")
        header = peek_header(data)
        if groups is None and header["groups"] is not None:
            return _undecoded(data, f"the index was coded per pool folder ({header['groups']['count']} groups): "
                                    "pass --pool to decode it")
        return _decode(data, groups, max_images)[1]
    except PayloadError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, RecursionError, zstd.ZstdError) as e:
        raise PayloadError(f"malformed payload: {_one_line(e)}") from None


# ---------------------------------------------------------------------------------------------- files


def write(path: str | os.PathLike, p: Payload, level: int = 19, *, groups: Any = None) -> int:
    """Encode and write atomically (temp file in the same directory, fsync, rename): readers never see half a file."""
    return write_bytes(path, encode(p, level, groups=groups))


def write_bytes(path: str | os.PathLike, data: bytes) -> int:
    """Write an encoded payload atomically: the sender writes the very bytes its search measured."""
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise PladaError(f"cannot write payload {path}: directory {directory} does not exist")
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # 0o666 lets the umask decide permissions, as a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise PladaError(f"cannot write payload {path}: {e.strerror or _one_line(e)}") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return len(data)  # platforms without directory fds (Windows): the rename is still atomic
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return len(data)


def read_bytes(path: str | os.PathLike) -> bytes:
    """A payload file's bytes, refusing oversized files before reading them."""
    path = Path(path)
    with reading(path, "payload"):
        if path.exists() and not stat.S_ISREG(os.stat(path).st_mode) and not path.is_dir():
            raise PayloadError(f"payload is not a regular file (a FIFO or device would hang or never end): {path}")
    with reading(path, "payload"), open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_PAYLOAD_BYTES:
            raise PayloadError(f"payload too large: {path} is {size} bytes (limit {MAX_PAYLOAD_BYTES})")
        return f.read(size + 1)


def read(path: str | os.PathLike, groups: Any = None, *, max_images: int | None = DEFAULT_MAX_IMAGES) -> Payload:
    """Load and fully validate a payload file (``groups`` and ``max_images`` as for `decode`)."""
    data = read_bytes(path)
    try:
        return decode(data, groups, max_images=max_images)
    except PayloadError as e:
        raise PayloadError(f"{e} (file {path})") from None

