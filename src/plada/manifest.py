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
_FOLDER_BYTES = 1 << 23  # text per block of `Manifest.folders`: its scratch is a few times this (~40 MiB)
_LOW_BYTES = np.array([(1 << (8 * i)) - 1 for i in range(9)], dtype=np.uint64)  # the first i bytes of a word
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
        # Every step below works on a bounded run of lines (at most _CHUNK_BYTES of text), so checking holds
        # the text, one int64 per line and scratch of a few chunks: no full-size temporary per separator.
        ends = np.concatenate([np.flatnonzero(buf[a : a + _CHUNK_BYTES] == 0x0A) + a
                               for a in range(0, len(buf), _CHUNK_BYTES)])
        bad = np.zeros(len(ends), dtype=bool)
        for r0, r1 in _line_runs(ends):
            e = ends[r0:r1]
            st = _starts(ends, r0, r1)
            seg = buf[st[0] : e[-1] + 1]
            b = e - st < _TAIL + 1  # room for a non-empty path, the tab and the hash
            for ch in (0x09, 0x0D, 0x00):  # exactly one tab per line; no CR or NUL anywhere
                at = np.flatnonzero(seg == ch) + st[0]
                per_line = np.bincount(np.searchsorted(e, at), minlength=len(e))
                b |= per_line != (1 if ch == 0x09 else 0)
            ok = np.flatnonzero(~b)
            b[ok[buf[e[ok] - _TAIL] != 0x09]] = True  # the tab must sit right before the hash
            step = 65536  # lines per hex check: its index matrix is 128 B a line
            for a in range(0, len(ok), step):
                rows = ok[a : a + step]
                digits = buf[(e[rows] - HASH_HEX)[:, None] + np.arange(HASH_HEX)]
                b[rows[~_HEX[digits].all(1)]] = True
            bad[r0:r1] = b
        if bad.any():
            raise PladaError(f"{where} is not a pool manifest: line {int(np.argmax(bad)) + 1} is not "
                             f"`path<TAB>{HASH_HEX}-hex-hash`")
        _check_order(buf, ends, where)
        return cls(raw, ends)

    def folders(self) -> tuple[np.ndarray, list[str]]:
        """`folder_groups(self.paths)`, found in numpy over bounded blocks of lines, one `bytes` per run of lines.

        Why: a `str` per path is ~20 s and 14M short-lived objects at ImageNet-21K's 14.2M images. Here each
        block finds every path's last "/" at once, marks where a line's folder differs from the line before
        (length, then bytes), and only the first line of each run of equal folders is sliced out: one Python
        step per run (about one per folder), not per image. Runs that repeat a folder (`a/b/1`, `a/c`, `a/d/2`)
        or are cut by a block edge meet again in the dict. Folders are keyed by their UTF-8 bytes, whose order
        is code-point order, so sorting them sorts the names as `str` does.
        """
        buf, ends, raw = self._buf, self._ends, self.raw
        # Every 8 bytes from each offset, as one word: a folder is compared 8 bytes per step. A word starting
        # inside a path never runs past its line (the path is followed by a tab and 16 hex digits).
        words = np.ndarray((max(0, len(raw) - 7),), dtype="<u8", buffer=raw, strides=(1,))
        seen: dict[bytes, int] = {}
        run_ids: list[np.ndarray] = []
        run_lens: list[np.ndarray] = []
        for r0, r1 in _line_runs(ends, _FOLDER_BYTES):
            st = _starts(ends, r0, r1)
            pe = ends[r0:r1] - _TAIL  # each path's end (its tab); the hash after it is hex, so holds no "/"
            slash = np.flatnonzero(buf[st[0] : pe[-1]] == 0x2F) + st[0]
            k = np.searchsorted(slash, pe) - 1  # the last "/" before each path's end, if it is in that line
            has = np.flatnonzero(k >= 0)
            has = has[slash[k[has]] >= st[has]]
            fe = pe.copy()  # folder end: that "/", or the path's end when it has none (`rsplit("/", 1)[0]`)
            fe[has] = slash[k[has]]
            flen = fe - st
            new = np.ones(r1 - r0, dtype=bool)  # line starts a run: its folder differs from the line before
            same = np.flatnonzero(flen[1:] == flen[:-1]) + 1
            new[same[flen[same] == 0]] = False  # two empty folders ("/x" paths)
            same = same[flen[same] > 0]
            if len(same):
                nw = (flen[same] + 7) // 8  # words per folder
                off = np.cumsum(nw) - nw  # where each pair's words start in the flat comparison
                j = np.arange(int(nw.sum()), dtype=np.int64) - np.repeat(off, nw)  # word number within its folder
                at = np.repeat(st[same - 1], nw) + 8 * j  # the earlier line's folder, word by word
                x = words[at] ^ words[at + np.repeat(st[same] - st[same - 1], nw)]
                x &= _LOW_BYTES[np.minimum(np.repeat(flen[same], nw) - 8 * j, 8)]  # a last word: its folder bytes only
                new[same] = np.logical_or.reduceat(x != 0, off)
            first = np.flatnonzero(new)
            run_lens.append(np.diff(first, append=r1 - r0))
            run_ids.append(np.fromiter((seen.setdefault(raw[s0:s1], len(seen))
                                        for s0, s1 in zip(st[first].tolist(), fe[first].tolist(), strict=True)),
                                       dtype=np.int64, count=len(first)))
        names = sorted(seen)
        if not run_ids:
            return np.zeros(0, dtype=np.int64), []
        rank = np.empty(len(names), dtype=np.int64)
        rank[[seen[n] for n in names]] = np.arange(len(names))
        return np.repeat(rank[np.concatenate(run_ids)], np.concatenate(run_lens)), [n.decode("utf-8") for n in names]

    @classmethod
    def of(cls, paths: Sequence[str], hashes: Sequence[str]) -> Manifest:
        """The canonical manifest of these rows (checked like a file: unsorted or duplicate paths fail)."""
        return cls.parse(manifest_text(paths, hashes))


class ManifestWriter:
    """A manifest built a block of lines at a time, in pool order: its bytes and line ends, no per-line objects.

    Why: a builder that collected every path and hash as Python strings first would hold about 2 GB more
    than the manifest itself at 14.2M images. The caller guarantees the order; `Manifest.parse` checks it.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ends: list[np.ndarray] = []
        self._size = 0

    def add(self, lines: Sequence[bytes]) -> None:
        """Append whole `path<TAB>hash<LF>` lines."""
        if not lines:
            return
        lens = np.fromiter((len(x) for x in lines), dtype=np.int64, count=len(lines))
        self._ends.append(self._size + np.cumsum(lens) - 1)
        self._parts.append(b"".join(lines))
        self._size += int(lens.sum())

    def __len__(self) -> int:
        return sum(len(e) for e in self._ends)

    def finish(self) -> Manifest:
        raw = b"".join(self._parts)
        self._parts.clear()  # the blocks, now copied into raw
        return Manifest(raw, np.concatenate(self._ends) if self._ends else np.zeros(0, dtype=np.int64))


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


def folder_groups(paths: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Group id per path (its folder: the path up to its last "/", the whole path when it has none) and the
    sorted folder names; ids follow the sorted names. A manifest's path column is read in numpy
    (`Manifest.folders`), any other sequence a path at a time.
    """
    if isinstance(paths, _Column) and paths._field == "path":
        return paths._m.folders()
    # A dict rather than np.unique over an array of folder strings: at 14M paths that array
    # alone would be ~2 GB of fixed-width unicode. Ids follow the sorted folder names.
    first_seen: dict[str, int] = {}
    raw = np.fromiter((first_seen.setdefault(p.rsplit("/", 1)[0], len(first_seen)) for p in paths),
                      dtype=np.int64, count=len(paths))
    names = sorted(first_seen)
    rank = np.empty(len(names), dtype=np.int64)
    rank[[first_seen[n] for n in names]] = np.arange(len(names))
    return rank[raw], names


def manifest_text(paths: Sequence[str], hashes: Sequence[str]) -> bytes:
    """The canonical manifest: one `path<TAB>hash` line per image, in pool order."""
    if isinstance(paths, _Column) and isinstance(hashes, _Column) and paths._m is hashes._m:
        return paths._m.raw
    if len(paths) != len(hashes):
        raise ValueError(f"{len(paths)} paths but {len(hashes)} hashes")
    step = 65536  # joined a block at a time: one 14M-line join would first hold 14M line strings
    return b"".join("".join(f"{paths[i]}\t{hashes[i]}\n" for i in range(a, min(a + step, len(paths)))).encode()
                    for a in range(0, len(paths), step))


def _line_runs(ends: np.ndarray, size: int | None = None) -> Iterator[tuple[int, int]]:
    """(first, stop) line numbers of consecutive runs of lines, each at most `size` bytes of text (or one line).

    `size` defaults to _CHUNK_BYTES, read at call time so tests can shrink it.
    """
    size = _CHUNK_BYTES if size is None else size
    n, r0 = len(ends), 0
    while r0 < n:
        first = int(ends[r0 - 1]) + 1 if r0 else 0
        r1 = min(n, max(r0 + 1, int(np.searchsorted(ends, first + size))))
        yield r0, r1
        r0 = r1


def _starts(ends: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Byte offset of the first character of lines r0..r1-1."""
    st = np.empty(r1 - r0, dtype=np.int64)
    st[0] = ends[r0 - 1] + 1 if r0 else 0
    st[1:] = ends[r0 : r1 - 1] + 1
    return st


def _check_order(buf: np.ndarray, ends: np.ndarray, where: object) -> None:
    """Paths strictly increasing byte-wise (UTF-8 byte order is code-point order, so `sorted(str)` order).

    Consecutive paths are compared as zero-padded rows of a matrix, a bounded chunk at a time (each chunk
    overlaps the next by one line); zero padding is exact because NUL was refused.
    """
    n = len(ends)
    a = 0
    while a < n - 1:
        head = min(n, a + 4096)
        lens = ends[a:head] - _TAIL - _starts(ends, a, head)
        b = min(n, a + max(2, _CHUNK_BYTES // 16 // max(1, int(lens.max()))))
        starts = _starts(ends, a, b)
        stops = ends[a:b] - _TAIL
        lens = stops - starts
        while b - a > 2 and (b - a) * int(lens.max()) > _CHUNK_BYTES // 16:
            b = a + (b - a) // 2
            starts, stops, lens = starts[: b - a], stops[: b - a], lens[: b - a]
        width = max(1, int(lens.max()))
        seg = np.zeros(int(stops[-1] - starts[0]) + width, dtype=np.uint8)
        seg[: stops[-1] - starts[0]] = buf[starts[0] : stops[-1]]
        m = np.lib.stride_tricks.sliding_window_view(seg, width)[starts - starts[0]]  # a copy: rows x width
        m[np.arange(width)[None, :] >= lens[:, None]] = 0
        x, y = m[:-1], m[1:]
        diff = x != y
        if not diff.any(1).all():
            raise PladaError(f"{where} lists the same image path twice")
        first = diff.argmax(1)
        r = np.arange(len(first))
        if (x[r, first] > y[r, first]).any():
            raise PladaError(f"{where} is not in pool order (paths must be sorted)")
        a = b - 1
