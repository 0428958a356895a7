"""The pool manifest held as its own bytes: one buffer plus one offset per line, not millions of strings.

Why: every sender and receiver holds the whole manifest (it fixes the pool's order and places every
shard member). As Python lists of `str` a path and its hash cost about 190 bytes per image held and
420 at peak while parsing (measured at 120k images): 2.7 GB held and 6 GB at peak for ImageNet-21K's
14.2M images. Here a line costs its own bytes plus one int64 offset (about 75 bytes for Tiny-ImageNet
paths), parsing and checking run in numpy over bounded chunks, and a path or hash becomes a `str`
only when somebody asks for that row.

Lines are `path<TAB>hash<LF>` with a 16-hex-digit hash, so a line's fields are found from its end
alone: the hash is the 16 bytes before the newline and the path ends 17 bytes before it.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

from .errors import PladaError

HASH_HEX = 16
_TAIL = HASH_HEX + 1  # "\t" + hash, before each "\n"
_CHUNK_BYTES = 1 << 26  # bound on the scratch arrays of one checking step (64 MiB)
_HEX = np.zeros(256, dtype=bool)
_HEX[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = True


class _Column(Sequence[str]):
    """Read-only view of one manifest field; `str` per row on demand, a list for a slice."""

    def __init__(self, m: Manifest, field: str) -> None:
        self._m, self._field = m, field

    def __len__(self) -> int:
        return len(self._m)

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self._m.field(j, self._field) for j in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"manifest row {i} out of range ({n} rows)")
        return self._m.field(i % n, self._field)

    def __iter__(self) -> Iterator[str]:
        m, f = self._m, self._field
        return (m.field(i, f) for i in range(len(m)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _Column | list | tuple):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    def __hash__(self) -> int:  # a view of mutable-looking data: unhashable like a list
        raise TypeError("unhashable type: manifest column")

    def __repr__(self) -> str:
        return f"<manifest {self._field}: {len(self)} rows>"


class Manifest:
    """A checked, canonical manifest: `paths` and `hashes` columns over its raw bytes."""

    def __init__(self, raw: bytes, ends: np.ndarray) -> None:
        self.raw = raw
        self._buf = np.frombuffer(raw, dtype=np.uint8)
        self._ends = ends  # index of each line's "\n"
        self.paths: Sequence[str] = _Column(self, "path")
        self.hashes: Sequence[str] = _Column(self, "hash")

    def __len__(self) -> int:
        return len(self._ends)

    def field(self, i: int, which: str) -> str:
        end = int(self._ends[i])
        if which == "hash":
            return self.raw[end - HASH_HEX : end].decode("ascii")
        start = int(self._ends[i - 1]) + 1 if i else 0
        return self.raw[start : end - _TAIL].decode("utf-8")

    @classmethod
    def parse(cls, raw: bytes, where: object = "manifest") -> Manifest:
        """Check `raw` is byte-canonical (UTF-8, one `path<TAB>16-hex` line each, sorted, unique) and index it.

        Byte-canonical matters: the fingerprint is the hash of these exact bytes, so a manifest that was
        re-encoded or re-sorted on the way must fail here, not at receive time.
        """
        buf = np.frombuffer(raw, dtype=np.uint8)
        if not len(buf) or buf[-1] != 0x0A:
            raise PladaError(f"{where} is not a pool manifest (empty, or its last line lacks a newline)")
        dec = codecs.getincrementaldecoder("utf-8")()
        try:
            for a in range(0, len(raw), _CHUNK_BYTES):
                dec.decode(raw[a : a + _CHUNK_BYTES], final=a + _CHUNK_BYTES >= len(raw))
        except UnicodeDecodeError:
            raise PladaError(f"{where} is not a pool manifest (not UTF-8 text)") from None
        ends = np.flatnonzero(buf == 0x0A)
        starts = np.empty_like(ends)
        starts[0], starts[1:] = 0, ends[:-1] + 1
        bad = ends - starts < _TAIL + 1  # room for a non-empty path, the tab and the hash
        for ch in (0x09, 0x0D, 0x00):  # exactly one tab per line; no CR or NUL anywhere
            at = np.flatnonzero(buf == ch)
            per_line = np.bincount(np.searchsorted(ends, at), minlength=len(ends))
            bad |= per_line != (1 if ch == 0x09 else 0)
        ok = np.flatnonzero(~bad)
        tail = ends[ok] - _TAIL  # where each tab must be
        bad[ok[buf[tail] != 0x09]] = True
        step = max(1, _CHUNK_BYTES // HASH_HEX // 8)
        for a in range(0, len(ok), step):
            rows = ok[a : a + step]
            digits = buf[(ends[rows] - HASH_HEX)[:, None] + np.arange(HASH_HEX)]
            bad[rows[~_HEX[digits].all(1)]] = True
        if bad.any():
            raise PladaError(f"{where} is not a pool manifest: line {int(np.argmax(bad)) + 1} is not "
                             f"`path<TAB>{HASH_HEX}-hex-hash`")
        _check_order(buf, starts, ends - _TAIL, where)
        return cls(raw, ends)

    @classmethod
    def of(cls, paths: Sequence[str], hashes: Sequence[str]) -> Manifest:
        """The canonical manifest of these rows (checked like a file: unsorted or duplicate paths fail)."""
        return cls.parse(manifest_text(paths, hashes))


_UNSTORABLE = ("\n", "\t", "\r", "\x00")  # line and field separators, and what `Manifest.parse` refuses


def unstorable_paths(paths: Sequence[str]) -> list[str]:
    """Paths no manifest line can hold: a newline, tab, CR or NUL, or text that is not UTF-8 (lone surrogates).

    Why: written anyway, such a path gives a manifest that `Manifest.parse` refuses, so a pool built from
    it could never be opened; a builder asks this first and names the files instead.
    """
    bad = []
    for p in paths:
        if any(c in p for c in _UNSTORABLE):
            bad.append(p)
            continue
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            bad.append(p)
    return bad


def manifest_text(paths: Sequence[str], hashes: Sequence[str]) -> bytes:
    """The canonical manifest: one `path<TAB>hash` line per image, in pool order."""
    if isinstance(paths, _Column) and isinstance(hashes, _Column) and paths._m is hashes._m:
        return paths._m.raw
    if len(paths) != len(hashes):
        raise ValueError(f"{len(paths)} paths but {len(hashes)} hashes")
    step = 65536  # joined a block at a time: one 14M-line join would first hold 14M line strings
    return b"".join("".join(f"{paths[i]}\t{hashes[i]}\n" for i in range(a, min(a + step, len(paths)))).encode()
                    for a in range(0, len(paths), step))


def _check_order(buf: np.ndarray, starts: np.ndarray, stops: np.ndarray, where: object) -> None:
    """Paths strictly increasing byte-wise (UTF-8 byte order is code-point order, so `sorted(str)` order).

    Consecutive paths are compared as zero-padded rows of a matrix, a bounded chunk at a time;
    zero padding is exact because NUL was refused.
    """
    n = len(starts)
    lens = stops - starts
    a = 0
    while a < n - 1:
        b = min(n, a + max(2, _CHUNK_BYTES // 4 // max(1, int(lens[a : a + 4096].max()))))
        while b - a > 2 and (b - a) * int(lens[a:b].max()) > _CHUNK_BYTES // 4:
            b = a + (b - a) // 2
        width = max(1, int(lens[a:b].max()))
        seg = np.zeros(int(stops[b - 1] - starts[a]) + width, dtype=np.uint8)
        seg[: stops[b - 1] - starts[a]] = buf[starts[a] : stops[b - 1]]
        m = np.lib.stride_tricks.sliding_window_view(seg, width)[starts[a:b] - starts[a]]  # a copy: rows x width
        m[np.arange(width)[None, :] >= lens[a:b, None]] = 0
        x, y = m[:-1], m[1:]
        diff = x != y
        if not diff.any(1).all():
            raise PladaError(f"{where} lists the same image path twice")
        first = diff.argmax(1)
        r = np.arange(len(first))
        if (x[r, first] > y[r, first]).any():
            raise PladaError(f"{where} is not in pool order (paths must be sorted)")
        a = b - 1
