"""Mutation fuzzer for the `.plada` payload reader, longer than the property tests in the suite.

A payload arrives from the network, so `payload.decode` must answer any bytes with a one-line
`PayloadError` (or accept a valid payload), quickly and in bounded memory. Each case takes a valid
payload and damages it: truncation, bit flips, byte insertions and deletions, random bytes, header
rewrites and section corruption with a recomputed checksum (so the damage gets past the checksum),
splices of two payloads, and zstd bombs whose header claims up to `--bomb-count` kept images.

Plain seeded mutations rather than coverage-guided fuzzing: case i is rebuilt from `(seed, i)` alone,
so `--case i` replays any failure exactly. Memory is traced per case (tracemalloc, which sees numpy
and Python allocations) against `base + per_image * count`, where count is what the damaged header
claims: a reader that allocates in proportion to what the file claims, not to its bytes, is the
bound's business; anything above it is a failure.

    python scripts/fuzz_payload.py --cases 100000 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
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
GROUPED = "groups" in inspect.signature(P.decode).parameters  # format version 2 (joint, per-group codec)
INTS = [0, 1, -1, 2, 7, 255, 256, 65535, 65536, 2**31, 2**32, 2**40, 2**40 + 1, 2**53, 2**63, 2**64, -(2**63),
        P.MAX_COUNT, P.MAX_COUNT + 1, 10**30]
NAMES = [f"n{i}" for i in range(65536)]
ODD = [None, True, False, 1.5, float("nan"), float("inf"), "", "x", "0" * 64, [], {}, [1, 2], {"a": 1}, "\ud800"]


def corpus() -> tuple[list[tuple[bytes, np.ndarray | None]], list[float]]:
    """Valid payloads of every shape the reader knows, each with the groups it was coded with (or None).

    Empty, sparse, dense (bitmap), many classes, huge N; and, where the format has a per-group joint
    codec, the same selections coded per group. Weights: the 65,535-class payload has a 0.5 MB
    header that would otherwise eat the run.
    """
    rng = np.random.default_rng(0)
    shapes = [(1, 0, 1), (1, 1, 1), (10, 3, 2), (320, 32, 3), (1000, 500, 10), (120_000, 1200, 10),
              (120_000, 30_000, 10), (5000, 2000, 300), (70_000, 5000, 65535), (2**40, 5, 2), (1_000_000, 20_000, 200)]
    seeds, weights = [], []
    for n, k, c in shapes:
        idx = np.sort(rng.choice(n, size=k, replace=False)) if n < 2**32 else np.sort(rng.integers(0, n, k))
        idx = np.unique(idx)
        labels = rng.integers(0, c, idx.size)
        meta = {"policy": "lowest-energy", "keep": 0.01, "nested": {"a": [1, 2, {"b": None}]}}
        p = P.Payload(hashlib.sha256(f"{n}".encode()).hexdigest(), n, tuple(f"c{i}" for i in range(c)),
                      idx, labels, meta)
        weight = 0.05 if c > 1000 else 1.0
        seeds.append((P.encode(p, level=3), None))
        weights.append(weight)
        if GROUPED and 1 < n <= 2**31:
            groups = np.arange(n) * 10 // n  # ten folders
            seeds.append((P.encode(p, level=3, groups=groups), groups))
            weights.append(weight)
    return seeds, weights


ZHEADER = getattr(P, "ZHEADER_VERSIONS", {})  # format versions 3 and 4: the header is a zstd frame


def split(data: bytes) -> tuple[dict, list[bytes], int]:
    """Header (inflated if compressed), sections, and the file's format version."""
    _, version, hlen = PREFIX.unpack_from(data)
    stored = data[PREFIX.size : PREFIX.size + hlen]
    if version in ZHEADER:
        d = zstd.ZstdCompressionDict(P.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)
        stored = zstd.ZstdDecompressor(dict_data=d).decompress(stored)
    header = json.loads(stored)
    blobs, pos = [], PREFIX.size + hlen
    for sec in header["sections"]:
        blobs.append(data[pos : pos + sec["length"]])
        pos += sec["length"]
    return header, blobs, version


def pack(header: dict | bytes, blobs: list[bytes], fix_lengths: bool = True, hlen: int | None = None,
         version: int = 1) -> bytes:
    """Header and sections with a fresh, valid checksum: damage that the checksum does not stop.

    Versions 3 and 4 get the (damaged) header compressed, so the damage reaches the JSON checks through
    the compressed path too."""
    if isinstance(header, dict):
        if fix_lengths and isinstance(header.get("sections"), list):
            for sec, blob in zip(header["sections"], blobs, strict=False):
                if isinstance(sec, dict):
                    sec["length"] = len(blob)
        header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if version in ZHEADER:
        header = P._compress_header(header, 3)
    body = PREFIX.pack(P.MAGIC, version, len(header) if hlen is None else hlen) + header + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


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
    header, blobs, version = split(data)
    kind = r.choice(["field", "field", "section", "keys", "raw", "hlen", "version", "nesting", "names"])
    fix = True
    if kind == "field":
        key = r.choice(["pool_fingerprint", "pool_size", "count", "class_names", "meta"])
        if key in ("pool_size", "count") and r.random() < 0.5:  # near misses reach the deeper checks
            header[key] = max(0, header["count"] + r.choice([-2, -1, 1, 2]))
        else:
            header[key] = r.choice(INTS + ODD)
    elif kind == "section":
        sec = r.choice(header["sections"])
        field = r.choice(["name", "codec", "length", "extra"])
        if field == "length":
            sec["length"] = r.choice(INTS + [sec["length"] + r.choice([-1, 1])])
            fix = False
        elif field == "extra":
            sec["offset"] = 0
        else:
            sec[field] = r.choice(["index", "labels", "gap-zstd", "bitmap-zstd", "u8-zstd", "u16-zstd", "", 3, None])
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
        header["meta"] = "META"
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        raw = raw.replace(b'"META"', b"[" * depth + b"]" * depth)
        return "header-" + kind, pack(raw, blobs, version=version)
    elif kind == "raw":
        raw = bytearray(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        for _ in range(r.choice([1, 3])):
            pos = r.randrange(len(raw))
            raw[pos : pos + 1] = r.choice([b"", b"\x00", b"\xff", b"{", b'"', b",", b"NaN", b"1e999", b"-",
                                           r.randbytes(1)])
        raw = raw.replace(b'"count"', b'"count":0,"count"') if r.random() < 0.1 else raw
        return "header-" + kind, pack(bytes(raw), blobs, version=version)
    elif kind == "hlen":
        raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        return "header-" + kind, pack(raw, blobs, hlen=r.choice([0, 1, len(raw) - 1, len(raw) + 1, 2**20 + 1,
                                                                  2**32 - 1, r.randrange(2**32)]), version=version)
    elif kind == "version":
        return "header-" + kind, pack(header, blobs, version=r.choice([0, 1, 2, 3, 4, 5, 255, 65535]))
    return "header-" + kind, pack(header, blobs, fix_lengths=fix, version=version)


def section_mutation(r: random.Random, data: bytes) -> tuple[str, bytes]:
    header, blobs, version = split(data)
    if not blobs:
        return "section-none", data
    i = r.randrange(len(blobs))
    kind = r.choice(["bytes", "recompress", "swap", "empty", "concat"])
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
    return "section-" + kind, pack(header, blobs, version=version)


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
            header = {"pool_fingerprint": "ab" * 32, "pool_size": pool, "class_names": ["a", "b"],
                      "count": c, "meta": {}, "sections": [{"name": "index", "codec": codec, "length": 0},
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
        h = json.loads(data[PREFIX.size : PREFIX.size + min(hlen, P.MAX_HEADER_BYTES)])
        c, n = h["count"], h["pool_size"]
        if not (isinstance(c, int) and isinstance(n, int) and 0 <= c <= n):
            return 0, 0
        return min(c, P.MAX_COUNT), min(n, P.BITMAP_MAX_BITS)
    except Exception:  # any unreadable header claims nothing
        return 0, 0


def run_case(data: bytes, groups: object) -> str:
    """Decode; a valid result must survive an encode/decode round trip (the reader accepts only what is sound)."""
    kw = {"groups": groups} if groups is not None else {}
    try:
        p = P.decode(data, **kw)
    except PladaError as e:
        if "\n" in str(e) or not str(e):
            raise AssertionError(f"error message not one line: {e!r}") from None
        return type(e).__name__
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
    ap.add_argument("--max-seconds", type=float, default=1.0, help="per-case time limit")
    ap.add_argument("--mem-base-mib", type=float, default=32.0)
    ap.add_argument("--mem-per-image", type=float, default=128.0, help="bytes allowed per claimed kept image")
    ap.add_argument("--mem-per-bitmap-byte", type=float, default=24.0,
                    help="bytes allowed per byte of the bitmap the claimed pool size implies")
    ap.add_argument("--out", default="results/fuzz_payload.json")
    a = ap.parse_args(argv)

    seeds, bomb_list = corpus(), bombs(a.bomb_count)
    cases = [a.case] if a.case is not None else range(a.cases)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
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
        t0 = time.perf_counter()
        error = None
        try:
            outcome = run_case(data, groups)
        except Exception as e:  # anything but PladaError is what we are looking for
            outcome, error = "crash", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
        dt = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
        outcomes[outcome] += 1
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
