"""Mutation fuzzer for the `.plada` payload reader, longer than the property tests in the suite.

A payload arrives from the network, so `payload.decode` must answer any bytes with a one-line
`PayloadError` (or accept a valid payload), quickly and in bounded memory. Each case takes a valid
format 1.0 payload and damages it: truncation, bit flips, byte insertions and deletions, random bytes,
header rewrites (every field, `forecast`, `receiver` and `groups` included; re-compressed with the
header dictionary, so the damage reaches the JSON checks), damage to the header's zstd frame itself,
section corruption with a recomputed checksum (so the damage gets past the checksum), extra words after
a joint section, splices of two payloads, and zstd bombs, in a section or in the header, whose header
claims up to `--bomb-count` kept images.

Plain seeded mutations rather than coverage-guided fuzzing: case i is rebuilt from `(seed, i)` alone,
so `--case i` replays any failure exactly. Memory is traced per case (tracemalloc, which sees numpy
and Python allocations) against `base + per_image * count`, where count is what the damaged header
claims: a reader that allocates in proportion to what the file claims, not to its bytes, is the
bound's business; anything above it is a failure.

    python scripts/fuzz_payload.py --cases 100000 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import resource
import struct
import sys
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import zstandard as zstd

from plada import payload as P
from plada.data import atomic_write
from plada.errors import PladaError

PREFIX = struct.Struct("<8sHI")
HEADER_ZDICT = zstd.ZstdCompressionDict(P.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)
# Prefix versions to write: plada 0.x's drafts, near misses of 1.0 (0.255, 1.1), other majors, and 1.0 itself.
VERSIONS = [0, *P.DRAFT_VERSIONS, 5, 255, P.FORMAT_VERSION - 1, P.FORMAT_VERSION, P.FORMAT_VERSION + 1, 0x0200, 0xFFFF]
INTS = [0, 1, -1, 2, 7, 255, 256, 65535, 65536, 2**31, 2**32, 2**40, 2**40 + 1, 2**53, 2**63, 2**64, -(2**63),
        P.MAX_COUNT, P.MAX_COUNT + 1, 10**30]
NAMES = [f"n{i}" for i in range(65536)]
ODD = [None, True, False, 1.5, float("nan"), float("inf"), "", "x", "0" * 64, [], {}, [1, 2], {"a": 1}, "\ud800"]
FORECASTS = [None, 0, 1, 0.0, 1.0, 0.5, 0.12345678, -0.0, -1e-9, 1.0000001, 2, -1, 1e308, 10**400, True, False,
             "0.5", [0.5], {"p": 0.5}]
RECEIVERS = [*P.RECEIVERS, "Plain", "PLAIN", "distill", "", " plain", "plain\n", None, 0, ["plain"], {"plain": 1}]


def corpus() -> tuple[list[tuple[bytes, np.ndarray | None]], list[float]]:
    """Valid payloads of every shape the reader knows, each with the groups it was coded with (or None).

    Empty, sparse, dense (bitmap), many classes, huge N, each forecast and receiver mode; the smallest
    codec wins (index + labels or joint), and each selection is also coded per group (the joint section
    with a `groups` header). Weights: the 65,535-class payload has a 0.5 MB header that would otherwise
    eat the run.
    """
    rng = np.random.default_rng(0)
    shapes = [(1, 0, 1), (1, 1, 1), (10, 3, 2), (320, 32, 3), (1000, 500, 10), (120_000, 1200, 10),
              (120_000, 30_000, 10), (5000, 2000, 300), (70_000, 5000, 65535), (2**40, 5, 2), (1_000_000, 20_000, 200)]
    seeds, weights = [], []
    for j, (n, k, c) in enumerate(shapes):
        idx = np.sort(rng.choice(n, size=k, replace=False)) if n < 2**32 else np.sort(rng.integers(0, n, k))
        idx = np.unique(idx)
        labels = rng.integers(0, c, idx.size)
        forecast = [None, 0.4123, 1.0, 0.0, 0.98765][j % 5]
        p = P.Payload(hashlib.sha256(f"{n}".encode()).hexdigest(), n, tuple(f"c{i}" for i in range(c)),
                      idx, labels, forecast=forecast, receiver=P.LABEL_RECEIVERS[j % len(P.LABEL_RECEIVERS)])
        weight = 0.05 if c > 1000 else 1.0
        seeds.append((P.encode(p, level=3), None))
        weights.append(weight)
        if k < 5000:  # the same selection in the index + labels layout, wherever the joint section won
            seeds.append((P.encode(p, level=3, codecs=("gap-zstd", "bitmap-zstd")), None))
            weights.append(weight)
        if 1 < n <= 2**31:
            groups = np.arange(n) * 10 // n  # ten folders
            seeds.append((P.encode(p, level=3, groups=groups, codecs=(P.JOINT_CODEC,)), groups))
            weights.append(weight)
        if c <= 300 and j % 2 == 0:  # the same selection with a head section (4- and 8-bit in turn)
            bits, dim = (4, 8)[j // 2 % 2], 1 + 7 * j
            top = 2 ** (bits - 1) - 1
            h = P.Head("efficientnet-lite0", 64, bits, rng.integers(-top, top + 1, (c, dim)),
                       rng.uniform(1e-3, 1, c), rng.normal(0, 1, c))
            seeds.append((P.encode(dataclasses.replace(p, receiver="head", head=h), level=3), None))
            weights.append(weight)
    return seeds, weights


def zip_header(text: bytes, level: int = 3, **kw: object) -> bytes:
    """A header frame as 1.0 writes it: the header dictionary, content size declared, no dictionary ID."""
    kw = {"write_content_size": True, "write_dict_id": False, **kw}
    return zstd.ZstdCompressor(level=level, dict_data=HEADER_ZDICT, **kw).compress(text)


def unzip_header(stored: bytes) -> bytes:
    """A (possibly damaged) stored header inflated with the dictionary, never past 1 MiB; raises if unreadable."""
    return zstd.ZstdDecompressor(dict_data=HEADER_ZDICT).decompress(stored, max_output_size=P.MAX_HEADER_BYTES)


def split(data: bytes) -> tuple[dict, list[bytes]]:
    """Inflated header and sections of a valid (seed or bomb) file."""
    _, _, hlen = PREFIX.unpack_from(data)
    header = json.loads(unzip_header(data[PREFIX.size : PREFIX.size + hlen]))
    blobs, pos = [], PREFIX.size + hlen
    for sec in header["sections"]:
        blobs.append(data[pos : pos + sec["length"]])
        pos += sec["length"]
    return header, blobs


def dumps(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def seal(stored: bytes, blobs: list[bytes], hlen: int | None = None, version: int = P.FORMAT_VERSION) -> bytes:
    """Prefix, the stored header bytes as given, sections and a fresh, valid checksum."""
    body = PREFIX.pack(P.MAGIC, version, len(stored) if hlen is None else hlen) + stored + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def pack(header: dict | bytes, blobs: list[bytes], fix_lengths: bool = True, hlen: int | None = None,
         version: int = P.FORMAT_VERSION) -> bytes:
    """Header (a dict, or JSON text) compressed with the header dictionary, sections, and a fresh, valid
    checksum: damage that the checksum does not stop, reaching the JSON checks behind the header frame."""
    if isinstance(header, dict):
        if fix_lengths and isinstance(header.get("sections"), list):
            for sec, blob in zip(header["sections"], blobs, strict=False):
                if isinstance(sec, dict):
                    sec["length"] = len(blob)
        header = dumps(header)
    return seal(zip_header(header), blobs, hlen, version)


def reseal(data: bytes) -> bytes:
    body = data[:-32] if len(data) >= 32 else data
    return body + hashlib.sha256(body).digest()


def bytes_mutation(r: random.Random, data: bytes) -> tuple[str, bytes]:
    b = bytearray(data)
    kind = r.choice(["truncate", "flip", "insert", "delete", "overwrite", "duplicate"])
    if kind == "truncate":
        return kind, bytes(b[: r.randrange(len(b) + 1)])
    for _ in range(r.choice([1, 1, 2, 4, 16])):
        pos = r.randrange(len(b) + 1)
        if kind == "flip" and b:
            b[pos % len(b)] ^= 1 << r.randrange(8)
        elif kind == "insert":
            b[pos:pos] = r.randbytes(r.choice([1, 2, 8, 64]))
        elif kind == "delete":
            del b[pos : pos + r.choice([1, 2, 8, 64])]
        elif kind == "overwrite":
            b[pos : pos + 4] = r.choice([b"\x00" * 4, b"\xff" * 4, b"\x28\xb5\x2f\xfd", r.randbytes(4)])
        elif kind == "duplicate":
            a = r.randrange(len(b) + 1)
            b[pos:pos] = b[a : a + r.choice([4, 32, 256])]
    return kind, bytes(b)


def header_mutation(r: random.Random, data: bytes) -> tuple[str, bytes]:
    header, blobs = split(data)
    kind = r.choice(["field", "field", "section", "keys", "raw", "hlen", "version", "nesting", "names",
                     "forecast", "receiver", "groups", "frame", "frame"])
    fix = True
    if kind == "field":
        key = r.choice(["pool_fingerprint", "pool_size", "count", "class_names", "forecast", "receiver", "groups"])
        if key in ("pool_size", "count") and r.random() < 0.5:  # near misses reach the deeper checks
            header[key] = max(0, header["count"] + r.choice([-2, -1, 1, 2]))
        else:
            header[key] = r.choice(INTS + ODD)
    elif kind == "forecast":
        header["forecast"] = r.choice(FORECASTS + [r.random(), r.uniform(-0.5, 1.5)])
    elif kind == "receiver":
        header["receiver"] = r.choice(RECEIVERS)
    elif kind == "groups":  # valid-looking groups on either layout, near misses of a real one, and odd values
        g = header["groups"] if isinstance(header["groups"], dict) else {"count": 10, "sha256": "0" * 64}
        header["groups"] = r.choice([
            None, dict(g), {**g, "count": g["count"] + r.choice([-1, 1])}, {**g, "count": 1},
            {**g, "count": header["pool_size"] + 1}, {**g, "count": True}, {**g, "count": float(g["count"])},
            {**g, "sha256": g["sha256"][::-1]}, {**g, "sha256": g["sha256"].upper()}, {**g, "sha256": None},
            {"count": g["count"]}, {**g, "extra": 1}, {}, [], 0, False, "groups",
        ])
    elif kind == "frame":  # the stored header frame itself: damaged, lying, unbounded or not zstd at all
        text = dumps(header)
        good = zip_header(text)
        frame = r.choice(["bytes", "no-size", "extra", "plain", "no-dict", "checksum", "bomb", "skippable", "empty"])
        stored = {
            "bytes": lambda: bytes_mutation(r, good)[1],
            "no-size": lambda: zip_header(text, write_content_size=False),
            "extra": lambda: good + r.choice([b"\x00", good, r.randbytes(r.choice([1, 4, 32]))]),
            "plain": lambda: text,
            "no-dict": lambda: zstd.ZstdCompressor(level=3).compress(text),
            "checksum": lambda: zip_header(text, write_checksum=True)[:-1] + r.randbytes(1),
            "bomb": lambda: zip_header(text[:-1] + b" " * r.choice([P.MAX_HEADER_BYTES, 2**22, 2**24]) + b"}", 1),
            "skippable": lambda: b"\x50\x2a\x4d\x18" + struct.pack("<I", len(good)) + good,
            "empty": lambda: b"",
        }[frame]()
        return f"header-frame-{frame}", seal(stored, blobs)
    elif kind == "section":
        sec = r.choice(header["sections"])
        field = r.choice(["name", "codec", "length", "extra"])
        if field == "length":
            sec["length"] = r.choice(INTS + [sec["length"] + r.choice([-1, 1])])
            fix = False
        elif field == "extra":
            sec["offset"] = 0
        else:
            sec[field] = r.choice(["index", "labels", "joint", "gap-zstd", "bitmap-zstd", "u8-zstd", "u16-zstd",
                                   "ctx-range", "", 3, None])
        if r.random() < 0.3:
            header["sections"] = r.choice([[], header["sections"][::-1], header["sections"] * 2, {}, None])
    elif kind == "keys":
        if r.random() < 0.5:
            header.pop(r.choice(sorted(header)))
        else:
            header[r.choice(["extra", "Count", "__proto__"])] = 1
    elif kind == "names":
        c = r.choice([0, 1, 2, 256, 257, 65535, 65536])
        header["class_names"] = r.choice([NAMES[:c], ["a", "a"], [""], [1, 2], ["x" * 10**5],
                                          ["\ud800"]])
    elif kind == "nesting":  # written as text: deeper than json.dumps itself would go
        depth = r.choice([10, 500, 5000, 100_000])
        slot = r.choice(["forecast", "receiver", "groups", "class_names"])
        header[slot] = "NEST"
        raw = dumps(header)
        nest = b"[" * depth + b"]" * depth if r.random() < 0.5 else b'{"a":' * depth + b"1" + b"}" * depth
        return "header-" + kind, pack(raw.replace(b'"NEST"', nest), blobs)
    elif kind == "raw":
        raw = bytearray(dumps(header))
        for _ in range(r.choice([1, 3])):
            pos = r.randrange(len(raw))
            raw[pos : pos + 1] = r.choice([b"", b"\x00", b"\xff", b"{", b'"', b",", b"NaN", b"1e999", b"-",
                                           r.randbytes(1)])
        if r.random() < 0.1:
            key = r.choice([b'"count"', b'"forecast"', b'"receiver"', b'"groups"', b'"name"'])
            raw = raw.replace(key, key + b':0,' + key, 1)  # a duplicated key
        if r.random() < 0.1:
            raw = raw.replace(b'"forecast":', b'"forecast":' + r.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999",
                                                                         b"1" + b"0" * 400]) + b',"x":', 1)
        return "header-" + kind, pack(bytes(raw), blobs)
    elif kind == "hlen":
        stored = zip_header(dumps(header))
        return "header-" + kind, seal(stored, blobs, hlen=r.choice([0, 1, len(stored) - 1, len(stored) + 1, 2**20 + 1,
                                                                     2**32 - 1, r.randrange(2**32)]))
    elif kind == "version":
        return "header-" + kind, pack(header, blobs, version=r.choice(VERSIONS))
    return "header-" + kind, pack(header, blobs, fix_lengths=fix)


def section_mutation(r: random.Random, data: bytes) -> tuple[str, bytes]:
    header, blobs = split(data)
    if not blobs:
        return "section-none", data
    i = r.randrange(len(blobs))
    joint = header["sections"][i]["codec"] == P.JOINT_CODEC
    kind = r.choice(["bytes", "recompress", "swap", "empty", "concat", *(["words"] * 2 if joint else [])])
    if kind == "words":  # the joint section must be exactly the coder's sealed words: add, drop or alter one
        b = bytearray(blobs[i])
        how = r.choice(["append-zero", "append", "prepend", *(["drop-last", "alter"] if b else [])])  # no no-ops
        word = b"\x00" * 4 if how == "append-zero" else r.randbytes(4)
        if how in ("append", "append-zero"):
            b += word * r.choice([1, 1, 2])
        elif how == "prepend":
            b[:0] = word
        elif how == "drop-last":
            del b[-4:]
        else:
            pos = r.randrange(len(b) // 4) * 4
            b[pos : pos + 4] = word
        blobs[i] = bytes(b)
        return f"section-words-{how}", pack(header, blobs)
    if kind == "bytes":
        blobs[i] = bytes_mutation(r, blobs[i])[1] if blobs[i] else r.randbytes(8)
    elif kind == "recompress":  # valid zstd framing around damaged content: reaches the codec logic
        try:
            raw = bytearray(zstd.ZstdDecompressor().decompress(blobs[i]))
        except zstd.ZstdError:  # not zstd (the joint section): damage the bytes themselves
            raw = bytearray(blobs[i])
        raw = bytearray(bytes_mutation(r, bytes(raw))[1])
        if raw and r.random() < 0.5:
            raw[r.randrange(len(raw))] = r.choice([0x00, 0x7F, 0x80, 0xFF])
        blobs[i] = zstd.ZstdCompressor(level=1, write_content_size=r.random() < 0.9).compress(bytes(raw))
    elif kind == "swap":
        blobs = blobs[::-1]
    elif kind == "empty":
        blobs[i] = b""
    else:
        blobs[i] = blobs[i] + blobs[i]
    return "section-" + kind, pack(header, blobs)


def bombs(max_count: int) -> list[bytes]:
    """Small files whose header claims many kept images and whose frames inflate to the largest legal size.

    Gap bombs claim up to `max_count` images; bitmap bombs a tenth of that, since a bitmap may
    legally be 384 bytes per claimed image (ceil(N/8) <= 64 * 6k + 64 KiB).
    """
    out = []
    plans = [(c, "gap-zstd", n) for c in sorted({10, 1000, max_count // 10, max_count}) for n in (c, 6 * c)]
    plans += [(c, "bitmap-zstd", None) for c in sorted({10, 1000, max_count // 10})]
    for c, codec, n in plans:
        for fill in (b"\x00", b"\x80", b"\x81", b"\x7f", b"\xff", bytes(range(256))):
            pool = c if codec == "gap-zstd" else min(8 * (6 * 64 * c + P.BITMAP_SLACK), P.BITMAP_MAX_BITS)
            size = n if n is not None else (pool + 7) // 8
            raw = (fill * (size // len(fill) + 1))[:size]
            idx = zstd.ZstdCompressor(level=3).compress(raw)
            labels = zstd.ZstdCompressor(level=3).compress(bytes(c))
            header = {"pool_fingerprint": "ab" * 32, "pool_size": pool, "class_names": ["a", "b"], "count": c,
                      "groups": None, "forecast": 0.5, "receiver": "plain",
                      "sections": [{"name": "index", "codec": codec, "length": 0},
                                   {"name": "labels", "codec": "u8-zstd", "length": 0}]}
            out.append(pack(header, [idx, labels]))
    return out


def make_case(r: random.Random, seeds: tuple[list, list[float]], bomb_list: list[bytes]) -> tuple[str, bytes, object]:
    """(mutation, bytes, the groups to decode with): the seed's groups, so grouped payloads get decoded deeply."""
    x = r.random()
    data, groups = r.choices(*seeds)[0]
    kind, out = mutate(r, x, data, seeds, bomb_list)
    return kind, out, None if kind.startswith("bomb") else groups


def mutate(r: random.Random, x: float, data: bytes, seeds: tuple[list, list[float]], bomb_list: list[bytes]
           ) -> tuple[str, bytes]:
    if x < 0.15:
        kind, out = bytes_mutation(r, data)
        return "bytes-" + kind, out
    if x < 0.35:
        kind, out = bytes_mutation(r, data)
        return "bytes-resealed-" + kind, reseal(out)
    if x < 0.60:
        return header_mutation(r, data)
    if x < 0.80:
        return section_mutation(r, data)
    if x < 0.88:
        bomb = r.choice(bomb_list)
        if r.random() < 0.5:
            return "bomb", bomb
        kind, out = section_mutation(r, bomb)
        return "bomb-" + kind, out
    if x < 0.94:
        other = r.choices(*seeds)[0][0]
        a, b = r.randrange(len(data) + 1), r.randrange(len(other) + 1)
        return "splice", reseal(data[:a] + other[b:])
    n = r.choice([0, 1, 7, 8, 14, 45, 46, 100, 4096])
    tail = r.randbytes(n)
    return "random", (reseal(P.MAGIC + tail) if r.random() < 0.5 else tail)


def claims(data: bytes) -> tuple[int, int]:
    """(count, pool_size) the damaged header claims, clipped to what the reader accepts; (0, 0) if unreadable."""
    try:
        _, _, hlen = PREFIX.unpack_from(data)
        h = json.loads(unzip_header(data[PREFIX.size : PREFIX.size + min(hlen, P.MAX_HEADER_BYTES)]))
        c, n = h["count"], h["pool_size"]
        if not (isinstance(c, int) and isinstance(n, int) and 0 <= c <= n):
            return 0, 0
        return min(c, P.MAX_COUNT), min(n, P.BITMAP_MAX_BITS)
    except Exception:  # any unreadable header claims nothing
        return 0, 0


def run_case(data: bytes, groups: object, clock: list[float] | None = None) -> str:
    """Decode; a valid result must survive an encode/decode round trip (the reader accepts only what is sound).

    ``clock`` gets the reader's own time (the first decode): the time limit is on what a payload can make a
    receiver spend, not on the fuzzer's round-trip oracle, which re-encodes and decodes again."""
    kw = {"groups": groups} if groups is not None else {}
    t0 = time.perf_counter()
    try:
        p = P.decode(data, **kw)
    except PladaError as e:
        if "\n" in str(e) or not str(e):
            raise AssertionError(f"error message not one line: {e!r}") from None
        return type(e).__name__
    finally:
        if clock is not None:
            clock.append(time.perf_counter() - t0)
    kw = kw if groups is not None and len(groups) == p.pool_size else {}  # a mutation may change N
    if P.decode(P.encode(p, level=1, **kw), **kw) != p:
        raise AssertionError("accepted payload does not round-trip")
    return "valid"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", type=int, default=None, help="replay one case and show the outcome")
    ap.add_argument("--bomb-count", type=int, default=200_000, help="largest count a bomb's header claims")
    ap.add_argument("--max-seconds", type=float, default=1.0, help="per-case limit on the reader's decode")
    ap.add_argument("--mem-base-mib", type=float, default=32.0)
    ap.add_argument("--mem-per-image", type=float, default=128.0, help="bytes allowed per claimed kept image")
    ap.add_argument("--mem-per-bitmap-byte", type=float, default=24.0,
                    help="bytes allowed per byte of the bitmap the claimed pool size implies")
    ap.add_argument("--out", default="benchmarks/reports/fuzz_payload.json")
    a = ap.parse_args(argv)

    seeds, bomb_list = corpus(), bombs(a.bomb_count)
    cases = [a.case] if a.case is not None else range(a.cases)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    by_mutation: dict[str, Counter[str]] = {}
    failures: list[dict] = []
    worst_time = (0.0, None, None)
    worst_mem = (0, None, None, (0, 0))
    worst_ratio = 0.0
    t_start = time.perf_counter()
    tracemalloc.start()
    for i in cases:
        kind, data, groups = make_case(random.Random(f"{a.seed}:{i}"), seeds, bomb_list)
        kinds[kind.split("-")[0]] += 1
        claim, claim_n = claims(data)
        bound = a.mem_base_mib * 2**20 + a.mem_per_image * claim + a.mem_per_bitmap_byte * claim_n / 8
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        clock: list[float] = []
        error = None
        try:
            outcome = run_case(data, groups, clock)
        except Exception as e:  # anything but PladaError is what we are looking for
            outcome, error = "crash", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        dt = clock[0] if clock else 0.0  # the reader's decode, under tracemalloc (which slows it)
        peak = tracemalloc.get_traced_memory()[1] - base
        outcomes[outcome] += 1
        by_mutation.setdefault(kind, Counter())[outcome] += 1
        if dt > worst_time[0]:
            worst_time = (dt, i, kind)
        if peak > worst_mem[0]:
            worst_mem = (peak, i, kind, (claim, claim_n))
        worst_ratio = max(worst_ratio, peak / bound)
        if error is None and dt > a.max_seconds:
            error = f"took {dt:.2f}s"
        if error is None and peak > bound:
            error = f"traced {peak / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB (claimed count {claim})"
        if error is not None:
            failures.append({"case": i, "mutation": kind, "error": error, "sha256": hashlib.sha256(data).hexdigest()})
            if len(failures) <= 20:
                d = Path(a.out).parent / "fuzz_failures"
                d.mkdir(parents=True, exist_ok=True)
                (d / f"case{i}.plada").write_bytes(data)
        if a.case is not None:
            print(f"case {i}: {kind}, {len(data)} bytes, outcome {outcome}, {dt * 1000:.1f} ms, "
                  f"{peak / 2**20:.2f} MiB{', ' + error if error else ''}")
        if i and i % 10_000 == 0:
            print(f"{i} cases, {len(failures)} failures, {time.perf_counter() - t_start:.0f}s", file=sys.stderr)
    tracemalloc.stop()

    summary = {
        "command": " ".join(["python", "scripts/fuzz_payload.py", *(argv if argv is not None else sys.argv[1:])]),
        "seed": a.seed,
        "cases": len(cases),
        "failures": len(failures),
        "failure_examples": failures[:20],
        "outcomes": dict(outcomes),
        "mutations": dict(kinds),
        "outcomes_by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
        "seconds": round(time.perf_counter() - t_start, 1),
        "max_case_seconds": round(worst_time[0], 4),
        "max_case_seconds_at": {"case": worst_time[1], "mutation": worst_time[2]},
        "peak_traced_mib": round(worst_mem[0] / 2**20, 2),
        "peak_traced_at": {"case": worst_mem[1], "mutation": worst_mem[2], "claimed_count": worst_mem[3][0],
                           "claimed_pool_size": worst_mem[3][1]},
        "max_peak_over_bound": round(worst_ratio, 3),
        "memory_bound": f"{a.mem_base_mib} MiB + {a.mem_per_image} B x claimed count "
                        f"+ {a.mem_per_bitmap_byte} B x claimed bitmap byte (pool size / 8, pool size <= 2**31)",
        "bomb_max_claimed_count": a.bomb_count,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    for k in ("cases", "failures", "seconds", "max_case_seconds", "peak_traced_mib",
              "max_peak_over_bound", "peak_rss_mib"):
        print(f"{k}: {summary[k]}")
    print(f"outcomes: {summary['outcomes']}")
    if a.case is None:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(a.out, (json.dumps(summary, indent=1) + "\n").encode())
        print(f"wrote {a.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
