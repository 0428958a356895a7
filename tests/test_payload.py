"""Tests for the `.plada` payload format: round trips, codec choice, and hostile input."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import time
import tracemalloc

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plada import payload as P
from plada.errors import PayloadError, PladaError

FP = hashlib.sha256(b"test pool manifest").hexdigest()
ZSTD = ("gap-zstd", "bitmap-zstd")  # the format-version-1 codecs, for tests that take v1 files apart
PREFIX = struct.Struct("<8sHI")

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
meta_dicts = st.dictionaries(st.text(max_size=10), json_values, max_size=5)


def make(pool_size: int, k: int, n_classes: int = 10, seed: int = 0, meta: dict | None = None) -> P.Payload:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(pool_size, size=k, replace=False)) if k else np.zeros(0, np.int64)
    labels = rng.integers(0, n_classes, size=k)
    names = tuple(f"class-{i}" for i in range(n_classes))
    return P.Payload(FP, pool_size, names, idx, labels, {"policy": "test"} if meta is None else meta)


def layout(info: dict) -> int:
    """The format version a file's sections follow (1 or 2), whether or not its header is compressed."""
    return P.ZHEADER_VERSIONS.get(info["format_version"], info["format_version"])


def unzip_header(stored: bytes) -> bytes:
    d = zstd.ZstdCompressionDict(P.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    return zstd.ZstdDecompressor(dict_data=d).decompress(stored)


def unpack(data: bytes) -> tuple[dict, list[bytes]]:
    """Header (inflated when compressed) and sections; `pack` writes them back with a plain header."""
    _, version, hlen = PREFIX.unpack_from(data)
    stored = data[PREFIX.size : PREFIX.size + hlen]
    header = json.loads(unzip_header(stored) if version in P.ZHEADER_VERSIONS else stored)
    blobs, pos = [], PREFIX.size + hlen
    for sec in header["sections"]:
        blobs.append(data[pos : pos + sec["length"]])
        pos += sec["length"]
    assert pos == len(data) - 32
    return header, blobs


def pack(
    header: dict | bytes,
    blobs: list[bytes],
    *,
    fix_lengths: bool = True,
    version: int = 1,
    header_len: int | None = None,
) -> bytes:
    """Re-pack a (possibly hostile) header and sections with a fresh, valid checksum."""
    if isinstance(header, dict):
        header = json.loads(json.dumps(header))
        if fix_lengths and isinstance(header.get("sections"), list):
            for sec, blob in zip(header["sections"], blobs, strict=False):
                if isinstance(sec, dict):
                    sec["length"] = len(blob)
        header = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    hlen = len(header) if header_len is None else header_len
    body = PREFIX.pack(P.MAGIC, version, hlen) + header + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def z(raw: bytes, level: int = 3, content_size: bool = True) -> bytes:
    return zstd.ZstdCompressor(level=level, write_content_size=content_size).compress(raw)


def varints(values: list[int]) -> bytes:
    out = bytearray()
    for v in values:
        while v >= 0x80:
            out.append(v & 0x7F | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def reject(data: bytes, match: str | None = None) -> str:
    """Decoding must fail with PayloadError only, with a one-line message."""
    with pytest.raises(PayloadError, match=match) as info:
        P.decode(data)
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


@pytest.fixture(scope="module")
def small() -> tuple[P.Payload, bytes]:
    p = make(300, 40, n_classes=5, seed=7, meta={"keep": 0.13, "seed": 7})
    return p, P.encode(p, codecs=ZSTD)


# ---------------------------------------------------------------------------------------------- round trips


@st.composite
def payloads(draw: st.DrawFn) -> P.Payload:
    # Size classes drawn uniformly, so pools in the millions are as common as tiny ones.
    lo, hi = draw(st.sampled_from([(1, 64), (65, 100_000), (100_001, 1_000_000), (1_000_001, 5_000_000)]))
    n = draw(st.integers(lo, hi))
    k_max = min(n, 20_000)
    lo, hi = draw(st.sampled_from([(0, 0), (1, 100), (101, 20_000), (20_000, 20_000)]))
    k = draw(st.integers(min(lo, k_max), min(hi, k_max)))
    shape = draw(st.sampled_from(["random", "run", "strided"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if shape == "random":
        idx = np.sort(rng.choice(n, size=k, replace=False))
    elif shape == "run":
        start = int(rng.integers(0, n - k + 1))
        idx = np.arange(start, start + k)
    else:
        step = max(1, n // max(k, 1))
        idx = np.arange(0, n, step)[:k]
    n_classes = draw(st.integers(1, 300))
    exotic = draw(st.lists(st.text(min_size=1, max_size=6), max_size=min(n_classes, 4), unique=True))
    filler = (f"\x00gen{i}" for i in range(n_classes))
    names = tuple(exotic) + tuple(next(filler) for _ in range(n_classes - len(exotic)))
    labels = rng.integers(0, n_classes, size=idx.size)
    return P.Payload(FP, n, names, idx, labels, draw(meta_dicts))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=payloads(), zstd_only=st.booleans())
def test_round_trip_property(p: P.Payload, zstd_only: bool) -> None:
    level = 19 if p.pool_size <= 100_000 else 3  # level 19 on a 5M-pool bitmap is slow
    data = P.encode(p, level=level, codecs=ZSTD if zstd_only else None)
    q = P.decode(data)
    assert q == p
    assert np.array_equal(q.indices, p.indices) and q.indices.dtype == np.int64
    assert np.array_equal(q.labels, p.labels)
    assert q.labels.dtype == (np.uint8 if len(p.class_names) <= 256 else np.uint16)
    assert q.class_names == p.class_names and q.meta == p.meta and q.pool_size == p.pool_size
    info = P.describe(data)
    assert info["total_bytes"] == len(data) and info["count"] == p.count
    if layout(info) == 1:
        assert info["sections"][1]["codec"] == ("u8-zstd" if len(p.class_names) <= 256 else "u16-zstd")
    else:
        assert not zstd_only and [s["codec"] for s in info["sections"]] == ["ctx-range"]
        assert len(data) < len(P.encode(p, level=level, codecs=ZSTD))


def test_round_trip_large_pool_one_percent() -> None:
    n, k = 14_197_122, 141_971
    p = make(n, k, n_classes=1000, seed=3)
    data = P.encode(p, codecs=ZSTD)
    q = P.decode(data)
    assert q == p and q.count == k and q.labels.dtype == np.uint16
    assert len(data) < n // 8  # beats sending a raw bitmap
    info = P.describe(data)
    assert info["sections"][0]["codec"] == "gap-zstd"
    assert info["sections"][1]["raw_bytes"] == 2 * k


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 70_001])
@pytest.mark.parametrize("everything", [False, True])
def test_empty_and_full_selection(n: int, everything: bool) -> None:
    k = n if everything else 0
    p = P.Payload(FP, n, ("only",), np.arange(k), np.zeros(k, dtype=int), {})
    data = P.encode(p)
    q = P.decode(data)
    assert q == p and q.count == k
    if everything:
        assert np.array_equal(q.indices, np.arange(n))


def test_sixty_five_thousand_classes_and_max_label() -> None:
    names = tuple(str(i) for i in range(P.MAX_CLASSES))
    p = P.Payload(FP, 100, names, [0, 50, 99], [0, 65534, 300], {})
    assert P.decode(P.encode(p)) == p
    with pytest.raises(PayloadError, match="class names"):
        P.Payload(FP, 100, (*names, "one-too-many"), [], [], {})


def test_huge_pool_uses_gap_and_round_trips() -> None:
    rng = np.random.default_rng(5)
    idx = np.unique(rng.integers(0, 2**40, size=5000))
    idx[-1] = 2**40 - 1
    p = P.Payload(FP, 2**40, ("a", "b"), idx, rng.integers(0, 2, idx.size), {})
    data = P.encode(p)
    assert P.decode(data) == p
    assert P.describe(data)["sections"][0]["codec"] == "gap-zstd"


# ---------------------------------------------------------------------------------------------- codecs


def test_codec_choice_dense_bitmap_sparse_gap() -> None:
    dense, sparse = make(10_000, 6_000, seed=1), make(10_000, 10, seed=1)
    d_info, s_info = P.describe(P.encode(dense, codecs=ZSTD)), P.describe(P.encode(sparse, codecs=ZSTD))
    assert d_info["sections"][0]["codec"] == "bitmap-zstd"
    assert d_info["sections"][0]["raw_bytes"] == 1250 and d_info["sections"][0]["entries"] == 6000
    assert s_info["sections"][0]["codec"] == "gap-zstd"
    assert s_info["sections"][0]["entries"] == 10
    for info, data in ((d_info, P.encode(dense, codecs=ZSTD)), (s_info, P.encode(sparse, codecs=ZSTD))):
        assert layout(info) == 1 and info["total_bytes"] == len(data)
        assert 14 + info["header_bytes"] + sum(s["stored_bytes"] for s in info["sections"]) + 32 == len(data)
        assert info["pool_fingerprint"] == FP and info["class_count"] == 10


def test_codec_choice_matches_index_costs() -> None:
    for p in (make(10_000, 6_000, seed=2), make(10_000, 10, seed=2), make(50_000, 2_000, seed=2)):
        info = P.describe(P.encode(p, codecs=ZSTD))
        costs = P.index_costs(p.indices, p.pool_size)
        stored = info["sections"][0]["stored_bytes"]
        assert stored == min(costs["gap_zstd"], costs["bitmap_zstd"])
        best = "gap-zstd" if costs["gap_zstd"] <= costs["bitmap_zstd"] else "bitmap-zstd"
        assert info["sections"][0]["codec"] == best


@pytest.mark.parametrize("n, idx", [(1, [0]), (20, [1, 5, 7]), (16, [0, 8])])
def test_codec_tie_goes_to_gap(n: int, idx: list[int]) -> None:
    costs = P.index_costs(idx, n)
    assert costs["gap_zstd"] == costs["bitmap_zstd"]  # the case really is a tie
    p = P.Payload(FP, n, ("a",), idx, [0] * len(idx), {})
    assert P.describe(P.encode(p, codecs=ZSTD))["sections"][0]["codec"] == "gap-zstd"


def test_varint_codec_edges() -> None:
    vals = np.array([0, 1, 127, 128, 16383, 16384, 2**35 - 1, 2**35, 2**40 - 1, 2**42 - 1], dtype=np.uint64)
    raw = P._varint_encode(vals)
    assert raw == varints([int(v) for v in vals])
    assert np.array_equal(P._varint_decode(raw, vals.size), vals)


def test_deterministic_and_canonical() -> None:
    p = make(50_000, 3_000, n_classes=300, seed=9, meta={"b": [1, 2.5, None], "a": {"z": "ü", "y": True}})
    a, b = P.encode(p), P.encode(p)
    assert a == b
    assert P.encode(P.decode(a)) == a
    q = P.Payload(FP, 50_000, p.class_names, list(p.indices), list(p.labels), dict(reversed(p.meta.items())))
    assert P.encode(q) == a


def test_index_costs() -> None:
    n = 100_003
    p = make(n, 1_000, seed=4)
    costs = P.index_costs(p.indices, n)
    assert set(costs) == {"raw", "gap_zstd", "bitmap_zstd"}
    assert costs["raw"] == math.ceil(n / 8)
    assert 0 < costs["gap_zstd"] < costs["raw"] and 0 < costs["bitmap_zstd"] < costs["raw"]
    with_labels = P.index_costs(p.indices, n, labels=p.labels, n_classes=300)
    assert with_labels["raw"] == math.ceil((n + 1_000 * 9) / 8)
    assert with_labels["gap_zstd"] == costs["gap_zstd"]
    inferred = P.index_costs(p.indices, n, labels=np.array([0] * 999 + [4]))  # 5 classes -> 3 bits
    assert inferred["raw"] == math.ceil((n + 1_000 * 3) / 8)
    assert P.index_costs(p.indices, n, n_classes=1)["raw"] == math.ceil(n / 8)
    with pytest.raises(PladaError):
        P.index_costs([5, 3], n)


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"pool_fingerprint": "A" * 64}, "fingerprint"),
        ({"pool_fingerprint": "a" * 63}, "fingerprint"),
        ({"pool_fingerprint": None}, "fingerprint"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": 2**40 + 1}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"pool_size": 10.0}, "pool_size"),
        ({"indices": [3, 1], "labels": [0, 0]}, "strictly increasing"),
        ({"indices": [1, 1], "labels": [0, 0]}, "strictly increasing"),
        ({"indices": [-1, 2], "labels": [0, 0]}, "out of range"),
        ({"indices": [2, 10], "labels": [0, 0]}, "out of range"),
        ({"indices": np.array([2**64 - 1], dtype=np.uint64), "labels": [0]}, "out of range"),
        ({"indices": [1.0, 2.0], "labels": [0, 0]}, "integers"),
        ({"indices": [[1, 2]], "labels": [[0, 0]]}, "1-D"),
        ({"labels": [0]}, "length"),
        ({"labels": [0, 3]}, "label out of range"),
        ({"labels": [-1, 0]}, "label out of range"),
        ({"class_names": ()}, "class names"),
        ({"class_names": ("a", "")}, "non-empty"),
        ({"class_names": ("a", "a", "b")}, "unique"),
        ({"class_names": ("a", 3, "b")}, "non-empty strings"),
        ({"class_names": ("a", "\ud800", "b")}, "Unicode"),
        ({"class_names": "abc"}, "sequence"),
        ({"meta": []}, "meta"),
        ({"meta": {"x": (1, 2)}}, "round trip"),
        ({"meta": {1: "x"}}, "round trip"),
        ({"meta": {"x": float("nan")}}, "JSON"),
        ({"meta": {"x": np.int64(3)}}, "JSON"),
    ],
)
def test_payload_validation(changes: dict, match: str) -> None:
    fields = {
        "pool_fingerprint": FP,
        "pool_size": 10,
        "class_names": ("a", "b", "c"),
        "indices": [2, 5],
        "labels": [0, 2],
        "meta": {},
    }
    with pytest.raises(PayloadError, match=match):
        P.Payload(**{**fields, **changes})


def test_payload_is_immutable_and_validated_before_encode() -> None:
    p = make(100, 5)
    with pytest.raises(ValueError):
        p.indices[0] = 99
    p.meta["bad"] = object()
    with pytest.raises(PayloadError, match="meta"):
        P.encode(p)
    with pytest.raises(PladaError, match="level"):
        P.encode(make(100, 5), level=0)
    with pytest.raises(PayloadError, match="header too large"):
        P.encode(P.Payload(FP, 10, tuple("x" * 40 + str(i) for i in range(30_000)), [], [], {}))


# ---------------------------------------------------------------------------------------------- hostile input


def test_good_fixture_decodes(small: tuple[P.Payload, bytes]) -> None:
    p, data = small
    assert P.decode(data) == p
    header, blobs = unpack(data)
    assert P.decode(pack(header, blobs)) == p  # the repack helper itself is faithful


@settings(max_examples=500)
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    reject(data)


@settings(max_examples=500)
@given(tail=st.binary(max_size=300), version=st.integers(0, 3))
def test_random_bytes_after_magic(tail: bytes, version: int) -> None:
    reject(P.MAGIC + struct.pack("<H", version) + tail)


def test_every_truncation(small: tuple[P.Payload, bytes]) -> None:
    _, data = small
    for n in range(len(data)):
        msg = reject(data[:n])
        if n >= 46:
            assert msg == "payload checksum mismatch (corrupted or truncated)"
        else:
            assert msg.startswith("payload truncated")
    reject(data + b"\x00", "checksum mismatch")


def test_every_single_bit_flip(small: tuple[P.Payload, bytes]) -> None:
    _, data = small
    for pos in range(len(data)):
        for bit in range(8):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            msg = reject(bytes(bad))
            if pos < 8:
                assert "bad magic" in msg
            elif pos < 10 and int.from_bytes(bad[8:10], "little") not in P.READABLE_VERSIONS:
                assert msg.startswith("unsupported payload format version")
            else:
                assert msg == "payload checksum mismatch (corrupted or truncated)"


@settings(max_examples=100)
@given(pos=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_random_bit_flip(small: tuple[P.Payload, bytes], pos: int, bit: int) -> None:
    _, data = small
    bad = bytearray(data)
    bad[pos % len(data)] ^= 1 << bit
    reject(bytes(bad))


def test_error_messages(small: tuple[P.Payload, bytes]) -> None:
    _, data = small
    assert reject(b"GIF89a" + bytes(100)) == "not a .plada payload (bad magic)"
    assert reject(data[:5]).startswith("payload truncated")
    version7 = data[:8] + struct.pack("<H", 7) + data[10:]
    assert reject(version7) == "unsupported payload format version 7 (this plada reads versions 1, 2, 3, 4)"
    header, blobs = unpack(data)
    assert "missing ['groups']" in reject(pack(header, blobs, version=2))  # a v1 header is not a v2 one
    with pytest.raises(PayloadError, match="must be bytes"):
        P.decode("not bytes")  # type: ignore[arg-type]


def _mutated(small: tuple[P.Payload, bytes], **changes: object) -> bytes:
    header, blobs = unpack(small[1])
    header.update(changes)
    return pack(header, blobs)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"count": 10**9}, "out of range"),
        ({"count": 60_000_000, "pool_size": 2**40}, "unreasonable"),
        ({"count": 41}, "declares 40 decompressed bytes, expected 41..246"),
        ({"count": 39}, "varints"),
        ({"count": -1}, "count"),
        ({"count": "40"}, "integer"),
        ({"count": 40.0}, "integer"),
        ({"pool_size": 2**41}, "pool_size"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": True}, "integer"),
        ({"pool_size": 100}, "out of range"),  # kept indices reach ~290
        ({"pool_fingerprint": "x" * 64}, "fingerprint"),
        ({"class_names": []}, "class_names"),
        ({"class_names": "abcde"}, "class_names"),
        ({"class_names": ["a", "b", "c", "d", 5]}, "non-empty strings"),
        ({"class_names": ["a", "b", "c", "d", "d"]}, "unique"),
        ({"class_names": ["a", "b"]}, "label out of range"),
        ({"class_names": [str(i) for i in range(257)]}, "labels codec"),
        ({"meta": [1]}, "meta"),
        ({"sections": []}, "sections"),
        ({"sections": "index"}, "sections"),
        ({"extra": 1}, "unexpected"),
    ],
)
def test_hostile_header_fields(small: tuple[P.Payload, bytes], changes: dict, match: str) -> None:
    reject(_mutated(small, **changes), match)


def test_hostile_header_structure(small: tuple[P.Payload, bytes]) -> None:
    header, blobs = unpack(small[1])
    missing = {k: v for k, v in header.items() if k != "meta"}
    reject(pack(missing, blobs), "missing")
    reject(pack(dict(header, sections=header["sections"][::-1]), blobs[::-1]), "out of order")
    unknown = json.loads(json.dumps(header))
    unknown["sections"][0]["codec"] = "rle"
    reject(pack(unknown, blobs), "unknown index codec")
    wrong_labels = json.loads(json.dumps(header))
    wrong_labels["sections"][1]["codec"] = "u16-zstd"
    reject(pack(wrong_labels, blobs), "labels codec")
    extra_key = json.loads(json.dumps(header))
    extra_key["sections"][0]["offset"] = 0
    reject(pack(extra_key, blobs), "keys")
    for length in (-1, 10**18, "12", None):
        bad = json.loads(json.dumps(header))
        bad["sections"][0]["length"] = length
        reject(pack(bad, blobs, fix_lengths=False))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    reject(pack(b"[1,2]", blobs), "JSON object")
    reject(pack(b"\xff" + text, blobs), "UTF-8")
    reject(pack(text[:-1], blobs), "not valid JSON")
    reject(pack(text.replace(b'"meta":{', b'"meta":{"a":NaN,'), blobs), "NaN")
    reject(pack(text.replace(b'"meta":{', b'"meta":{"a":1e999,'), blobs), "meta")
    reject(pack(text.replace(b'"count":40', b'"count":40,"count":40'), blobs), "duplicated")
    digits = text.replace(b'"pool_size":300', b'"pool_size":' + b"9" * 5000)  # past int-parsing limit
    reject(pack(digits, blobs), "JSON")
    deep = b"[" * 200_000 + b"]" * 200_000
    reject(pack(text.replace(b'"meta":{', b'"meta":{"a":' + deep + b","), blobs), "nested too deeply")


def test_hostile_lengths(small: tuple[P.Payload, bytes]) -> None:
    header, blobs = unpack(small[1])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    reject(pack(header, [blobs[0], blobs[1] + b"junk"], fix_lengths=False), "trailing bytes")
    reject(pack(header, [blobs[0], blobs[1][:-1]], fix_lengths=False), "truncated")
    reject(pack(text, blobs, header_len=2**32 - 1), "exceeds")
    reject(pack(text, blobs, header_len=P.MAX_HEADER_BYTES), "runs past the end")
    reject(pack(text, blobs, header_len=len(text) - 1), "JSON")
    huge = json.loads(json.dumps(header))
    huge["sections"][0]["length"] = 2**40
    huge["sections"][1]["length"] = -(2**40) + len(blobs[0]) + len(blobs[1])
    reject(pack(huge, blobs, fix_lengths=False))


HEADER_SLOTS = [
    (None, k) for k in ("pool_fingerprint", "pool_size", "class_names", "count", "meta", "sections")
]
HEADER_SLOTS += [(i, k) for i in (0, 1) for k in ("name", "codec", "length")]


@settings(max_examples=300, deadline=1000)
@given(slot=st.sampled_from(HEADER_SLOTS), value=json_values)
def test_fuzzed_header_values(small: tuple[P.Payload, bytes], slot: tuple, value: object) -> None:
    """Any JSON value in any header slot: either a valid Payload or PayloadError, nothing else."""
    header, blobs = unpack(small[1])
    where, key = slot
    (header if where is None else header["sections"][where])[key] = value
    try:
        result = P.decode(pack(header, blobs, fix_lengths=False))
    except PayloadError as e:
        assert "\n" not in str(e)
    else:
        assert isinstance(result, P.Payload) and result.count == 40


@settings(max_examples=300, deadline=1000)
@given(section=st.sampled_from([0, 1]), raw=st.binary(max_size=400), compress=st.booleans())
def test_fuzzed_sections(small: tuple[P.Payload, bytes], section: int, raw: bytes, compress: bool) -> None:
    """Arbitrary section content under a valid checksum decodes to a valid Payload or PayloadError."""
    header, blobs = unpack(small[1])
    blobs[section] = z(raw) if compress else raw
    try:
        result = P.decode(pack(header, blobs))
    except PayloadError as e:
        assert "\n" not in str(e)
    else:
        assert result.count == 40 and P.decode(P.encode(result)) == result


def _gap_payload(values: list[int], *, pool_size: int = 300, count: int | None = None) -> bytes:
    header, blobs = unpack(P.encode(make(300, 40, n_classes=5, seed=7), codecs=ZSTD))
    count = len(values) if count is None else count
    header.update(pool_size=pool_size, count=count)
    header["sections"][0]["codec"] = "gap-zstd"
    return pack(header, [z(varints(values)), z(bytes(count))])


def test_hostile_index_sections() -> None:
    assert P.decode(_gap_payload([0, 0, 5, 100])).indices.tolist() == [0, 1, 7, 108]
    reject(_gap_payload([299, 0]), "out of range")  # 299 then 300
    reject(_gap_payload([2**42 - 1] * 4, pool_size=2**40), "out of range")
    reject(_gap_payload([2**40 - 2, 0, 0], pool_size=2**40), "out of range")
    reject(_gap_payload([1, 2, 3], count=2), "varints")
    reject(_gap_payload([1], count=0), "declares 1 decompressed bytes, expected 0")
    # non-canonical: 1 written as 0x81 0x00
    header, blobs = unpack(_gap_payload([1, 1]))
    reject(pack(header, [z(b"\x81\x00\x01"), blobs[1]]), "non-canonical")
    # seven-byte varint
    reject(pack(header, [z(b"\x80" * 6 + b"\x01" + b"\x01"), blobs[1]]), "longer than 6")
    # a varint cut off at the end of the section
    reject(pack(header, [z(b"\x01\x81"), blobs[1]]), "varints")


def _bitmap_payload(bitmap: bytes, *, pool_size: int, count: int) -> bytes:
    header, _ = unpack(P.encode(make(300, 40, n_classes=5, seed=7), codecs=ZSTD))
    header.update(pool_size=pool_size, count=count)
    header["sections"][0]["codec"] = "bitmap-zstd"
    return pack(header, [z(bitmap), z(bytes(count))])


def test_hostile_bitmap_sections() -> None:
    assert P.decode(_bitmap_payload(b"\x05\x80", pool_size=16, count=3)).indices.tolist() == [0, 2, 15]
    reject(_bitmap_payload(b"\x05\x80", pool_size=15, count=3), "padding")
    reject(_bitmap_payload(b"\x05\x80", pool_size=16, count=2), "bits set")
    reject(_bitmap_payload(b"\x05", pool_size=16, count=2), "declares 1 decompressed bytes, expected 2")
    # a bitmap far larger than any gap list for this count is refused before inflating it
    reject(_bitmap_payload(b"\x01", pool_size=2**30, count=1), "bitmap index codec not allowed")


def test_out_of_range_labels_and_unsorted_input(small: tuple[P.Payload, bytes]) -> None:
    header, blobs = unpack(small[1])
    reject(pack(header, [blobs[0], z(bytes(39) + b"\x05")]), "label out of range")
    reject(pack(header, [blobs[0], z(bytes(41))]), "declares 41")
    with pytest.raises(PayloadError, match="strictly increasing"):
        P.Payload(FP, 10, ("a",), [5, 4], [0, 0], {})


def _patch_content_size(frame: bytes, new_size: int) -> bytes:
    """Rewrite a frame header's declared content size (the frame body still inflates to the old one)."""
    desc = frame[4]
    fcs_flag, single, dict_flag = desc >> 6, (desc >> 5) & 1, desc & 3
    fcs_len = {0: single, 1: 2, 2: 4, 3: 8}[fcs_flag]
    off = 5 + (0 if single else 1) + {0: 0, 1: 1, 2: 2, 3: 4}[dict_flag]
    value = new_size - 256 if fcs_len == 2 else new_size
    return frame[:off] + value.to_bytes(fcs_len, "little") + frame[off + fcs_len :]


def test_decompression_bomb(small: tuple[P.Payload, bytes]) -> None:
    bomb = z(bytes(100_000_000), level=1)
    assert len(bomb) < 10_000
    header, blobs = unpack(P.encode(make(300, 10, n_classes=5, seed=1), codecs=ZSTD))
    liar = _patch_content_size(bomb, 10)
    assert zstd.get_frame_parameters(liar).content_size == 10
    cases = [
        ([blobs[0], bomb], "declares 100000000 decompressed bytes, expected 10"),
        ([bomb, blobs[1]], "declares 100000000"),
        ([blobs[0], liar], "labels section is corrupt"),
        ([blobs[0], z(bytes(100_000), content_size=False)], "does not declare"),
        ([blobs[0], z(bytes(10)) + z(bytes(10))], "corrupt"),
        ([blobs[0], b"\x50\x2a\x4d\x18" + struct.pack("<I", 10) + bytes(10)], "not a zstd frame"),
    ]
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for blobs_, match in cases:
            reject(pack(header, blobs_), match)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 20_000_000  # nowhere near the 100 MB the bomb would inflate to


# ---------------------------------------------------------------------------------------------- files


def test_write_read_atomic(tmp_path) -> None:
    p = make(10_000, 500, seed=11)
    target = tmp_path / "set.plada"
    n = P.write(target, p)
    assert n == target.stat().st_size == len(P.encode(p))
    assert os.listdir(tmp_path) == ["set.plada"]
    assert P.read(target) == p
    q = make(10_000, 20, seed=12)
    P.write(str(target), q)
    assert os.listdir(tmp_path) == ["set.plada"]
    assert P.read(str(target)) == q


def test_write_failure_leaves_old_file_and_no_temp(tmp_path, monkeypatch) -> None:
    target = tmp_path / "set.plada"
    P.write(target, make(1000, 10))
    before = target.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(PladaError, match="No space left"):
        P.write(target, make(1000, 20))
    assert os.listdir(tmp_path) == ["set.plada"]
    assert target.read_bytes() == before


def test_write_missing_dir_and_read_errors(tmp_path) -> None:
    with pytest.raises(PladaError, match="does not exist"):
        P.write(tmp_path / "nope" / "x.plada", make(100, 3))
    assert not (tmp_path / "nope").exists()
    with pytest.raises(PladaError, match="payload not found"):
        P.read(tmp_path / "missing.plada")
    with pytest.raises(PladaError, match="directory"):
        P.read(tmp_path)
    bad = tmp_path / "bad.plada"
    bad.write_bytes(b"hello world, not a payload")
    with pytest.raises(PayloadError, match="bad magic.*bad.plada"):
        P.read(bad)
    huge = tmp_path / "huge.plada"
    with open(huge, "wb") as f:
        f.truncate(P.MAX_PAYLOAD_BYTES + 1)  # sparse: costs no disk
    start = time.perf_counter()
    with pytest.raises(PayloadError, match="too large"):
        P.read(huge)
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------------------------------------- joint codec (v2)

# Written by plada before format version 2 existed: they must keep decoding.
GOLDEN_V1 = {
    "gap-zstd": (
        "504c414441000d0a0100320100007b22636c6173735f6e616d6573223a5b22636174222c22646f67222c22c3bc6ec3af225d2c"
        "22636f756e74223a352c226d657461223a7b226b656570223a302e3030352c22706f6c696379223a226c6f776573742d656e65"
        "726779227d2c22706f6f6c5f66696e6765727072696e74223a22656262666336383762363363363962326334396335656236"
        "6432353132373162386162326436623438656663643362623538363337396431616135336434653822"
        "2c22706f6f6c5f73697a65223a313030302c2273656374696f6e73223a5b7b22636f646563223a226761702d7a737464222c22"
        "6c656e677468223a31362c226e616d65223a22696e646578227d2c7b22636f646563223a2275382d7a737464222c226c656e"
        "677468223a31342c226e616d65223a226c6162656c73227d5d7d28b52ffd2007390000030d00e103f20328b52ffd20052900"
        "0000020101002c3c780900b5517a2301080b899de8043c858b43a20f83593af4edeba5670914"
    ),
    "bitmap-zstd": (
        "504c414441000d0a0100030100007b22636c6173735f6e616d6573223a5b2261222c2262225d2c22636f756e74223a33322c22"
        "6d657461223a7b7d2c22706f6f6c5f66696e6765727072696e74223a2265626266633638376236336336396232633439633565"
        "623664323531323731623861623264366234386566636433626235383633373964316161353364346538222c22706f6f6c5f"
        "73697a65223a36342c2273656374696f6e73223a5b7b22636f646563223a226269746d61702d7a737464222c226c656e6774"
        "68223a31322c226e616d65223a22696e646578227d2c7b22636f646563223a2275382d7a737464222c226c656e677468223a"
        "31382c226e616d65223a226c6162656c73227d5d7d28b52ffd20081d000041550028b52ffd20204d00001800010001"
        "00dd6e08ace8f69444dc0daff4c6b40979221db976f4ad9d0215675ef69f838d28e1db51"
    ),
}


def test_version_1_files_still_decode() -> None:
    gap = P.decode(bytes.fromhex(GOLDEN_V1["gap-zstd"]))
    assert gap.indices.tolist() == [3, 17, 18, 500, 999] and gap.labels.tolist() == [0, 2, 1, 1, 0]
    assert gap.class_names == ("cat", "dog", "ünï") and gap.meta == {"policy": "lowest-energy", "keep": 0.005}
    bitmap = P.decode(bytes.fromhex(GOLDEN_V1["bitmap-zstd"]), groups=np.arange(64) // 8)  # groups: ignored
    assert bitmap.indices.tolist() == list(range(0, 64, 2)) and bitmap.labels.tolist() == [0, 1] * 16
    for codec_name, text in GOLDEN_V1.items():
        info = P.describe(bytes.fromhex(text))
        assert info["format_version"] == 1 and info["sections"][0]["codec"] == codec_name
        assert info["groups"] is None


def grouped_payload(seed: int = 0) -> tuple[P.Payload, np.ndarray]:
    """A 120k pool in 400 folders of 300, 1% kept in clusters of folders, labels mostly the folder's own."""
    rng = np.random.default_rng(seed)
    gid = np.repeat(np.arange(400), 300)
    energy = rng.normal(0, 2, 400)[gid] + rng.normal(0, 1, gid.size)
    idx = np.sort(np.argpartition(energy, 1199)[:1200])
    labels = np.where(rng.random(idx.size) < 0.8, rng.integers(0, 10, 400)[gid[idx]], rng.integers(0, 10, idx.size))
    return P.Payload(FP, gid.size, tuple(f"class-{i}" for i in range(10)), idx, labels, {"policy": "t"}), gid


def test_smallest_codec_wins() -> None:
    p_grouped, gid = grouped_payload()
    cases = [
        (make(10_000, 6_000, seed=1), None),
        (make(10_000, 10, seed=1), None),
        (make(300, 40, n_classes=5, seed=7), None),
        (make(1000, 0), None),
        (p_grouped, gid),
        (p_grouped, None),
        (P.Payload(FP, 5000, ("a", "b"), np.arange(1000, 3000), [0] * 2000, {}), None),
    ]
    for p, groups in cases:
        sizes = {}
        for name in P.CODECS:
            try:
                sizes[name] = len(P.encode(p, groups=groups, codecs=(name,)))
            except PladaError:
                assert name == "bitmap-zstd"  # the only codec that can be inapplicable here
        data = P.encode(p, groups=groups)
        assert len(data) == min(sizes.values())
        info = P.describe(data, groups=groups)
        winner = "ctx-range" if layout(info) == 2 else info["sections"][0]["codec"]
        assert sizes[winner] == len(data)
        if min(sizes["gap-zstd"], sizes.get("bitmap-zstd", 1 << 60)) <= sizes["ctx-range"]:
            assert layout(info) == 1  # ties go to the older format
        assert P.decode(data, groups=groups) == p
    with pytest.raises(PladaError, match="codecs"):
        P.encode(make(100, 5), codecs=("rle",))
    with pytest.raises(PladaError, match="codecs"):
        P.encode(make(100, 5), codecs="gap-zstd")


def test_grouped_payload_needs_the_same_grouping(tmp_path) -> None:
    p, gid = grouped_payload()
    data = P.encode(p, groups=gid)
    info = P.describe(data, groups=gid)
    assert layout(info) == 2 and info["groups"]["count"] == 400
    assert [(s["name"], s["codec"], s["entries"]) for s in info["sections"]] == [("joint", "ctx-range", 1200)]
    assert 14 + info["header_bytes"] + info["sections"][0]["stored_bytes"] + 32 == len(data)
    assert P.decode(data, groups=gid) == p
    assert P.decode(data, groups=gid * 7 + 3) == p  # only the partition matters, not the ids
    assert len(data) < len(P.encode(p)) <= len(P.encode(p, codecs=ZSTD))  # the folders help
    assert "needs the pool's groups" in reject(data)
    with pytest.raises(PayloadError, match="different grouping"):
        P.decode(data, groups=np.repeat(np.arange(200), 600))
    with pytest.raises(PayloadError, match="groups"):
        P.decode(data, groups=gid[:-1])
    target = tmp_path / "grouped.plada"
    assert P.write(target, p, groups=gid) == len(data) == target.stat().st_size
    assert P.read(target, groups=gid) == p
    with pytest.raises(PayloadError, match="needs the pool's groups.*grouped.plada"):
        P.read(target)
    with pytest.raises(PayloadError, match="groups"):
        P.encode(p, groups=gid[:-1])  # checked even though it would be used only by the joint codec


def test_joint_payload_without_groups() -> None:
    p = make(10_000, 100, seed=3)
    data = P.encode(p)
    info = P.describe(data)
    assert layout(info) == 2 and info["groups"] is None
    assert P.decode(data) == p == P.decode(data, groups=np.arange(10_000) // 7)  # groups are not needed
    assert P.encode(p, groups=np.full(10_000, 4)) == data  # one folder codes like no folders
    assert P.encode(P.decode(data)) == data


@pytest.fixture(scope="module")
def joint() -> tuple[P.Payload, np.ndarray, bytes]:
    p, gid = grouped_payload(1)
    return p, gid, P.encode(p, groups=gid)


def reject_grouped(data: bytes, gid: np.ndarray, match: str | None = None) -> str:
    with pytest.raises(PayloadError, match=match) as info:
        P.decode(data, groups=gid)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"groups": {"count": 400}}, "'groups' must be null or have exactly"),
        ({"groups": [400]}, "'groups' must be null"),
        ({"groups": {"count": 1, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": 10**6, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": True, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": 400, "sha256": "A" * 64}}, "sha256"),
        ({"groups": {"count": 400, "sha256": "0" * 64}}, "different grouping"),
        ({"groups": {"count": 401, "sha256": None}}, "sha256"),
        ({"count": P.codec.MAX_COUNT + 1, "pool_size": 2**30}, "joint codec not allowed"),
        ({"pool_size": 2**31 + 1}, "joint codec not allowed"),
        ({"count": 1201}, "count"),
        ({"sections": []}, "exactly the joint section"),
        ({"sections": [{"name": "index", "codec": "ctx-range", "length": 0}]}, "must be 'joint'"),
        ({"sections": [{"name": "joint", "codec": "ctx-ans", "length": 0}]}, "unknown joint codec"),
        ({"sections": [{"name": "joint", "codec": "ctx-range", "length": 0, "x": 1}]}, "keys"),
        ({"class_names": ["a", "b"]}, None),  # a different class count reads the stream differently
    ],
)
def test_hostile_joint_headers(joint: tuple, changes: dict, match: str | None) -> None:
    _, gid, data = joint
    header, blobs = unpack(data)
    header.update(changes)
    fix = not any(isinstance(s, dict) and s.get("length") == 0 for s in changes.get("sections", [{}]))
    try:
        P.decode(pack(header, blobs, version=2, fix_lengths=fix), groups=gid)
    except PayloadError as e:
        assert "\n" not in str(e) and (match is None or re.search(match, str(e)))
    else:
        assert match is None


def test_hostile_joint_structure(joint: tuple) -> None:
    p, gid, data = joint
    header, blobs = unpack(data)
    reject_grouped(pack({k: v for k, v in header.items() if k != "groups"}, blobs, version=2), gid, "missing")
    reject_grouped(pack(header, blobs, version=1), gid, "unexpected \\['groups'\\]")
    reject_grouped(pack(header, [blobs[0][:-1]], version=2), gid, "32-bit words")
    reject_grouped(pack(header, [blobs[0] + b"\x00" * 8], version=2), gid, "trailing data")
    reject_grouped(pack(header, [blobs[0]], version=2, fix_lengths=False)[:-40] + data[-32:], gid, "checksum")
    assert P.decode(pack(header, blobs, version=2), groups=gid) == p


@settings(max_examples=200, deadline=2000)
@given(raw=st.binary(max_size=800), words=st.booleans())
def test_fuzzed_joint_sections(joint: tuple, raw: bytes, words: bool) -> None:
    """Arbitrary joint bytes under a valid checksum decode to a valid Payload or a PayloadError."""
    _, gid, data = joint
    header, _ = unpack(data)
    blob = raw[: len(raw) // 4 * 4] if words else raw
    try:
        result = P.decode(pack(header, [blob], version=2), groups=gid)
    except PayloadError as e:
        assert "\n" not in str(e)
    else:
        assert result.count == 1200 and P.decode(P.encode(result, groups=gid), groups=gid) == result


def test_bitmap_bomb_costs_its_bitmap_not_ten_times_more() -> None:
    """A few-KB file whose bitmap inflates to the most the header's count allows, every bit set."""
    count = 20_000
    nbytes = P.BITMAP_RATIO * P.MAX_VARINT_BYTES * count + P.BITMAP_SLACK
    idx_blob = P._compress(b"\xff" * nbytes, 19)
    lab_blob = P._compress(b"\x00" * count, 19)
    header = {"pool_fingerprint": "ab" * 32, "pool_size": nbytes * 8, "class_names": ["a", "b"], "count": count,
              "meta": {}, "sections": [{"name": "index", "codec": "bitmap-zstd", "length": len(idx_blob)},
                                       {"name": "labels", "codec": "u8-zstd", "length": len(lab_blob)}]}
    data = P._assemble(P.FORMAT_VERSION, header, [idx_blob, lab_blob])
    assert len(data) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="bits set"):
            P.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * nbytes  # was 18x the bitmap when it was unpacked whole


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31))
def test_groups_never_make_a_payload_bigger(k: int, seed: int) -> None:
    """Giving the pool's groups only adds candidates: a few images cost no more than without them."""
    rng = np.random.default_rng(seed)
    n = 20_000
    groups = np.repeat(np.arange(400), 50)
    idx = np.sort(rng.choice(n, k, replace=False))
    p = P.Payload(FP, n, ("a", "b", "c"), idx, rng.integers(0, 3, k), {"policy": "test"})
    with_groups = P.encode(p, groups=groups)
    assert len(with_groups) <= len(P.encode(p))
    assert P.decode(with_groups, groups=groups) == p


# ---------------------------------------------------------------------------------------------- compressed headers


def auto_like(n_classes: int = 43, k: int = 200, seed: int = 0) -> P.Payload:
    """A payload shaped like `plada send --budget`'s: GTSRB-style class names and the auto policy's meta."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(120_000, k, replace=False))
    meta = {"alpha": -0.2, "auto": {"budget_bytes": 1000, "forecast_accuracy": 0.0412, "heldout_images": 655,
                                    "labels_from_fold": 0, "proxy": "linear head, 1000 steps"},
            "count": k, "keep": None, "policy": "lowest-energy", "safety_share": 0.1, "seed": 0, "target": "gtsrb32",
            "teacher": {"mode": "finetune", "model": "efficientnet-lite0", "res": 64, "test_accuracy": 0.7103},
            "temperature": 1.0}
    names = tuple(f"{i:05d}" for i in range(n_classes))
    return P.Payload(FP, 120_000, names, idx, rng.integers(0, n_classes, k), meta)


def test_header_dictionary_is_frozen() -> None:
    """Compressed headers decode only with these exact bytes: an edit would misread every version 3/4 file."""
    assert hashlib.sha256(P.HEADER_DICT).hexdigest() == P.HEADER_DICT_SHA256
    assert P.HEADER_DICT_SHA256 == "7edc60d81e3c65c55dd3a79ab2e43f136cbb6490b1b8abc95f91a9c18dd8ee75"


def test_compressed_header_is_smaller_and_round_trips() -> None:
    p = auto_like()
    plain = len(json.dumps(unpack(P.encode(p))[0], sort_keys=True, separators=(",", ":")).encode())
    for codecs, want in ((None, 4), (ZSTD, 3)):
        data = P.encode(p, codecs=codecs)
        info = P.describe(data)
        assert info["format_version"] == want and info["header_codec"] == "zstd-dict"
        assert info["header_bytes"] < 300 < plain  # a 1 KB budget's header shrinks to under a third
        assert 14 + info["header_bytes"] + sum(s["stored_bytes"] for s in info["sections"]) + 32 == len(data)
        assert P.decode(data) == p and P.peek_header(data)["meta"] == p.meta
        assert P.encode(P.decode(data), codecs=codecs) == data


def test_plain_header_when_compression_does_not_pay() -> None:
    """Whichever header makes the smaller file is written; equal sizes keep the plain one (older readers)."""
    for p in (auto_like(), make(300, 40, n_classes=5, seed=7), make(50, 3, n_classes=1, meta={})):
        data = P.encode(p)
        header, _ = unpack(data)
        plain = len(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
        packed = len(P._compress_header(json.dumps(header, sort_keys=True, separators=(",", ":")).encode(), 19))
        info = P.describe(data)
        assert info["header_bytes"] == min(plain, packed)
        assert (info["format_version"] in P.ZHEADER_VERSIONS) == (packed < plain)


def _zheader_file(stored: bytes, blobs: list[bytes], version: int = 3) -> bytes:
    body = PREFIX.pack(P.MAGIC, version, len(stored)) + stored + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def test_hostile_compressed_headers(small: tuple[P.Payload, bytes]) -> None:
    header, blobs = unpack(small[1])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    good = P._compress_header(text, 19)
    assert P.decode(_zheader_file(good, blobs)) == small[0]
    bomb = P._compress_header(text[:-1] + b" " * 50_000_000 + b"}", 3)
    assert len(bomb) < 10_000
    cases = [
        (bomb, "declares 50000", None),
        (_patch_content_size(good, 300), "compressed header section is corrupt", None),
        (z(text, content_size=False), "does not declare", None),
        (good + b"\x00", "corrupt", None),
        (good[:-1], "corrupt", None),
        (text, "not a zstd frame", None),
        (b"", "not a zstd frame", None),
        (P._compress_header(b"\xff" + text, 19), "UTF-8", None),
        (P._compress_header(text[:-1], 19), "not valid JSON", None),
        (good, re.escape("missing ['groups']"), 4),  # a version 1 header in a version 4 file
    ]
    tracemalloc.start()
    try:
        for stored, match, version in cases:
            reject(_zheader_file(stored, blobs, version or 3), match)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000  # the 50 MB bomb was never inflated


@settings(max_examples=200, deadline=1000)
@given(raw=st.binary(max_size=400), compress=st.booleans(), version=st.sampled_from([3, 4]))
def test_fuzzed_compressed_headers(small: tuple[P.Payload, bytes], raw: bytes, compress: bool, version: int) -> None:
    _, blobs = unpack(small[1])
    stored = P._compress_header(raw, 3) if compress else raw
    try:
        result = P.decode(_zheader_file(stored, blobs, version))
    except PayloadError as e:
        assert "\n" not in str(e)
    else:
        assert result.count == 40
