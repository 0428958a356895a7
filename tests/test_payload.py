"""Tests for the `.plada` payload, format 1.0: round trips, codec choice, golden bytes, and hostile input."""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
ZSTD = ("gap-zstd", "bitmap-zstd")  # the index + labels layout, for tests that take such files apart
PREFIX = struct.Struct("<8sHI")
HEADER_KEYS = {"pool_fingerprint", "pool_size", "class_names", "count", "groups", "forecast", "receiver", "sections"}
# The dictionary as the format defines it (docs/FORMAT.md), built here rather than taken from the module.
HEADER_ZDICT = zstd.ZstdCompressionDict(P.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)

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
# Every kind of valid forecast: none, any float in [0, 1] (rounded on the way in), the ends as ints, rounding edges.
forecasts = st.none() | st.floats(0, 1) | st.sampled_from([0, 1, 0.0, 1.0, 0.5, 0.99995, 0.00005, 0.123449, -0.0])
receivers = st.sampled_from(P.LABEL_RECEIVERS)  # head payloads: tests/test_head.py


def make(pool_size: int, k: int, n_classes: int = 10, seed: int = 0, forecast: float | None = None,
         receiver: str = "plain") -> P.Payload:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(pool_size, size=k, replace=False)) if k else np.zeros(0, np.int64)
    labels = rng.integers(0, n_classes, size=k)
    names = tuple(f"class-{i}" for i in range(n_classes))
    return P.Payload(FP, pool_size, names, idx, labels, forecast=forecast, receiver=receiver)


def is_joint(info: dict) -> bool:
    """Whether a file holds the one joint section (else index + labels)."""
    return [s["name"] for s in info["sections"]] == ["joint"]


def canonical(header: dict) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def zip_header(text: bytes, level: int = 19, **kw: object) -> bytes:
    """A header frame as the format's writer makes it: the dictionary, size declared, no dictionary ID."""
    kw = {"write_content_size": True, "write_dict_id": False, **kw}
    return zstd.ZstdCompressor(level=level, dict_data=HEADER_ZDICT, **kw).compress(text)


def unzip_header(stored: bytes) -> bytes:
    return zstd.ZstdDecompressor(dict_data=HEADER_ZDICT).decompress(stored)


def unpack(data: bytes) -> tuple[dict, list[bytes]]:
    """Inflated header and sections of a valid file; `pack` writes them back."""
    magic, version, hlen = PREFIX.unpack_from(data)
    assert magic == P.MAGIC and version == P.FORMAT_VERSION
    header = json.loads(unzip_header(data[PREFIX.size : PREFIX.size + hlen]))
    blobs, pos = [], PREFIX.size + hlen
    for sec in header["sections"]:
        blobs.append(data[pos : pos + sec["length"]])
        pos += sec["length"]
    assert pos == len(data) - 32
    return header, blobs


def seal(stored: bytes, blobs: list[bytes], *, version: int = P.FORMAT_VERSION, header_len: int | None = None) -> bytes:
    """Prefix, the stored header bytes as given, sections, and a fresh, valid checksum."""
    hlen = len(stored) if header_len is None else header_len
    body = PREFIX.pack(P.MAGIC, version, hlen) + stored + b"".join(blobs)
    return body + hashlib.sha256(body).digest()


def pack(header: dict | bytes, blobs: list[bytes], *, fix_lengths: bool = True, version: int = P.FORMAT_VERSION,
         header_len: int | None = None, level: int = 19) -> bytes:
    """Re-pack a (possibly hostile) header, a dict or JSON text, as a dictionary-compressed 1.0 header.

    ``fix_lengths`` sets each section entry's length to its blob's, so the file reaches the checks past
    the length sum; the checksum is always valid, so the damage gets past it.
    """
    if isinstance(header, dict):
        header = json.loads(json.dumps(header))
        if fix_lengths and isinstance(header.get("sections"), list):
            for sec, blob in zip(header["sections"], blobs, strict=False):
                if isinstance(sec, dict):
                    sec["length"] = len(blob)
        header = canonical(header)
    return seal(zip_header(header, level), blobs, version=version, header_len=header_len)


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


def only_the_header_inflates(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make inflating any section an error; returns the list of what was inflated (the header only)."""
    seen: list[str] = []
    real = P._decompress

    def guarded(blob: bytes, lo: int, hi: int, what: str, *rest: object) -> bytes:
        seen.append(what)
        if what != "header":
            raise AssertionError(f"the {what} section was inflated")
        return real(blob, lo, hi, what, *rest)

    monkeypatch.setattr(P, "_decompress", guarded)
    return seen


@pytest.fixture(scope="module")
def small() -> tuple[P.Payload, bytes]:
    p = make(300, 40, n_classes=5, seed=7, forecast=0.4321, receiver="selftrain")
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
    return P.Payload(FP, n, names, idx, labels, forecast=draw(forecasts), receiver=draw(receivers))


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
    assert q.class_names == p.class_names and q.pool_size == p.pool_size
    assert q.forecast == p.forecast and q.receiver == p.receiver
    assert p.forecast is None or (isinstance(q.forecast, float) and round(q.forecast, P.FORECAST_DIGITS) == q.forecast)
    info = P.describe(data)
    assert info["format"] == "1.0" and info["total_bytes"] == len(data) and info["count"] == p.count
    assert info["forecast"] == p.forecast and info["receiver"] == p.receiver and info["groups"] is None
    assert P.peek_header(data)["receiver"] == p.receiver
    if not is_joint(info):
        assert info["sections"][1]["codec"] == ("u8-zstd" if len(p.class_names) <= 256 else "u16-zstd")
    else:
        assert not zstd_only and [s["codec"] for s in info["sections"]] == ["ctx-range"]
        assert len(data) < len(P.encode(p, level=level, codecs=ZSTD))


def test_round_trip_large_pool_one_percent() -> None:
    n, k = 14_197_122, 141_971
    p = make(n, k, n_classes=1000, seed=3, forecast=0.7, receiver="propagate")
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
    p = P.Payload(FP, n, ("only",), np.arange(k), np.zeros(k, dtype=int))
    data = P.encode(p)
    q = P.decode(data)
    assert q == p and q.count == k
    if everything:
        assert np.array_equal(q.indices, np.arange(n))


def test_sixty_five_thousand_classes_and_max_label() -> None:
    names = tuple(str(i) for i in range(P.MAX_CLASSES))
    p = P.Payload(FP, 100, names, [0, 50, 99], [0, 65534, 300])
    assert P.decode(P.encode(p)) == p
    with pytest.raises(PayloadError, match="class names"):
        P.Payload(FP, 100, (*names, "one-too-many"), [], [])


def test_huge_pool_uses_gap_and_round_trips() -> None:
    rng = np.random.default_rng(5)
    idx = np.unique(rng.integers(0, 2**40, size=5000))
    idx[-1] = 2**40 - 1
    p = P.Payload(FP, 2**40, ("a", "b"), idx, rng.integers(0, 2, idx.size))
    data = P.encode(p)
    assert P.decode(data) == p
    assert P.describe(data)["sections"][0]["codec"] == "gap-zstd"


def test_forecast_and_receiver_round_trip() -> None:
    forecasts = (None, 0, 1, 0.0, 1.0, 0.5, 0.04125, 0.123456, np.float64(0.25), np.float32(0.75), 0.99996, None)
    for i, forecast in enumerate(forecasts):
        receiver = P.LABEL_RECEIVERS[i % len(P.LABEL_RECEIVERS)]  # each mode with a forecast and without
        p = make(1000, 30, forecast=forecast, receiver=receiver)
        want = None if forecast is None else round(float(forecast), P.FORECAST_DIGITS)
        assert p.forecast == want and (want is None or type(p.forecast) is float)
        assert p.receiver == receiver and type(p.receiver) is str
        for codecs in (None, ZSTD):
            data = P.encode(p, codecs=codecs)
            q = P.decode(data)
            assert q == p and q.forecast == want and q.receiver == receiver
            header = P.peek_header(data)
            assert header["forecast"] == want and header["receiver"] == receiver
            info = P.describe(data)
            assert info["forecast"] == want and info["receiver"] == receiver
            assert unpack(data)[0]["forecast"] == want  # stored rounded, not as given
    assert make(10, 1, forecast=0.99996).forecast == 1.0 and make(10, 1, forecast=0.00004).forecast == 0.0
    assert make(10, 1).forecast is None and make(10, 1).receiver == "plain"  # the defaults


def test_equality_covers_every_field() -> None:
    p = make(1000, 30, forecast=0.5, receiver="selftrain")
    assert p == make(1000, 30, forecast=0.5, receiver="selftrain")
    assert p == make(1000, 30, forecast=0.50001, receiver="selftrain")  # the same after rounding
    others = [
        make(1000, 30, forecast=None, receiver="selftrain"),
        make(1000, 30, forecast=0.5001, receiver="selftrain"),
        make(1000, 30, forecast=0.5, receiver="plain"),
        make(1000, 30, forecast=0.5, receiver="propagate"),
        make(1001, 30, forecast=0.5, receiver="selftrain"),
        make(1000, 30, seed=1, forecast=0.5, receiver="selftrain"),
        make(1000, 30, n_classes=11, forecast=0.5, receiver="selftrain"),
        dataclasses.replace(p, pool_fingerprint="0" * 64),
        dataclasses.replace(p, labels=np.roll(p.labels, 1)),
    ]
    for q in others:
        assert q != p and p != q
    assert p != "not a payload" and p.__eq__(object()) is NotImplemented


# ---------------------------------------------------------------------------------------------- codecs


def test_codec_choice_dense_bitmap_sparse_gap() -> None:
    dense, sparse = make(10_000, 6_000, seed=1), make(10_000, 10, seed=1)
    d_info, s_info = P.describe(P.encode(dense, codecs=ZSTD)), P.describe(P.encode(sparse, codecs=ZSTD))
    assert d_info["sections"][0]["codec"] == "bitmap-zstd"
    assert d_info["sections"][0]["raw_bytes"] == 1250 and d_info["sections"][0]["entries"] == 6000
    assert s_info["sections"][0]["codec"] == "gap-zstd"
    assert s_info["sections"][0]["entries"] == 10
    for info, data in ((d_info, P.encode(dense, codecs=ZSTD)), (s_info, P.encode(sparse, codecs=ZSTD))):
        assert not is_joint(info) and info["total_bytes"] == len(data)
        assert 14 + info["header_bytes"] + sum(s["stored_bytes"] for s in info["sections"]) + 32 == len(data)
        assert info["pool_fingerprint"] == FP and info["class_count"] == 10


def test_varint_codec_edges() -> None:
    vals = np.array([0, 1, 127, 128, 16383, 16384, 2**35 - 1, 2**35, 2**40 - 1, 2**42 - 1], dtype=np.uint64)
    raw = P._varint_encode(vals)
    assert raw == varints([int(v) for v in vals])
    assert np.array_equal(P._varint_decode(raw, vals.size), vals)


def test_deterministic_and_canonical() -> None:
    p = make(50_000, 3_000, n_classes=300, seed=9, forecast=0.61234, receiver="propagate")
    a, b = P.encode(p), P.encode(p)
    assert a == b
    assert P.encode(P.decode(a)) == a
    for forecast in (0.6123, np.float64(0.61234), 0.612349):  # all the same once rounded
        q = P.Payload(FP, 50_000, list(p.class_names), list(p.indices), list(p.labels), forecast=forecast,
                      receiver="propagate")
        assert P.encode(q) == a
    for codecs in (None, ZSTD):
        data = P.encode(p, codecs=codecs)
        header, _ = unpack(data)
        assert unzip_header(data[14 : 14 + PREFIX.unpack_from(data)[2]]) == canonical(header)  # canonical JSON
    assert P.encode(dataclasses.replace(p, receiver="plain")) != a


# ---------------------------------------------------------------------------------------------- golden bytes

# docs/FORMAT.md's worked example. Its bytes depend on libzstd (the header frame) and on constriction (the
# joint section): a version of either that changes them fails here, before it changes what senders write.
EXAMPLE_HEX = (
    "504c414441000d0a00015800000028b52ffd20fa7d0200e2840e11c0eb1efa543613ff722b844810a6fdcb0d78e346933d74fd3319"
    "b539ccd42b1e1fb8257dd4ffad6a0a3cb2e54f4e73299de88c6a211000d3b70610077d4f8c2f21a0970f7447e4e28321571ea08d57"
    "a300b4a1612e30039b130598d64f1f246650973614ef006b8d8786e1e4af97ef"
)
EXAMPLE_HEADER = (
    '{"class_names":["cat","dog"],"count":4,"forecast":null,"groups":null,"pool_fingerprint":'
    '"50d858e0985ecc7f60418aaf0cc5ab587f42c2570a884095a9e8ccacd0f6545c","pool_size":20,"receiver":"plain",'
    '"sections":[{"codec":"ctx-range","length":4,"name":"joint"}]}'
)


def example() -> P.Payload:
    return P.Payload(hashlib.sha256(b"example").hexdigest(), 20, ("cat", "dog"), [2, 3, 11, 17], [0, 0, 1, 1],
                     forecast=None, receiver="plain")


def test_worked_example_golden_bytes() -> None:
    data = P.encode(example())
    assert len(data) == 138
    assert data.hex() == EXAMPLE_HEX
    assert P.decode(bytes.fromhex(EXAMPLE_HEX)) == example()
    # The fields, as docs/FORMAT.md's table lays them out.
    assert data[:8] == b"PLADA\x00\r\n" and data[8:10] == b"\x00\x01" and data[10:14] == (88).to_bytes(4, "little")
    stored = data[14 : 14 + 88]
    assert stored[:4] == b"\x28\xb5\x2f\xfd" and stored[4] == 0x20
    assert zstd.get_frame_parameters(stored).content_size == 250 == len(EXAMPLE_HEADER)
    assert zstd.get_frame_parameters(stored).dict_id == 0 and not zstd.get_frame_parameters(stored).has_checksum
    assert unzip_header(stored) == EXAMPLE_HEADER.encode()
    assert int.from_bytes(data[0x66:0x6A], "little") == 0x578DA01E  # the joint section: one word
    assert data[0x6A:] == hashlib.sha256(data[:0x6A]).digest()
    info = P.describe(data)
    assert info["header_bytes"] == 88 and info["sections"] == [
        {"name": "joint", "codec": "ctx-range", "entries": 4, "raw_bytes": 4, "stored_bytes": 4}]


def test_worked_example_with_the_gap_codec() -> None:
    """The same payload with codecs=["gap-zstd"]: 172 bytes, the two sections docs/FORMAT.md spells out."""
    data = P.encode(example(), codecs=["gap-zstd"])
    assert len(data) == 172 and PREFIX.unpack_from(data)[2] == 100
    header, blobs = unpack(data)
    assert [s["codec"] for s in header["sections"]] == ["gap-zstd", "u8-zstd"]
    assert blobs[0].hex() == "28b52ffd200421000002000705"  # varints 2, 0, 7, 5
    assert blobs[1].hex() == "28b52ffd200421000000000101"  # labels 0, 0, 1, 1
    assert P.decode(data) == example()


def test_describe_keys() -> None:
    """What `plada inspect` shows: the file's `format`, the forecast, receiver and head (None without one)."""
    want = {"format", "total_bytes", "header_bytes", "checksum_sha256", "pool_fingerprint", "pool_size", "count",
            "class_count", "class_names", "forecast", "receiver", "groups", "head", "sections", "decoded"}
    data = P.encode(make(1000, 30, forecast=0.25, receiver="propagate"))
    info = P.describe(data)
    assert set(info) == want and info["format"] == "1.0" and info["decoded"] and info["head"] is None
    assert info["forecast"] == 0.25 and info["receiver"] == "propagate"
    assert info["checksum_sha256"] == data[-32:].hex()
    undecoded = P.describe(data, header_only=True)
    assert set(undecoded) == want | {"note"} and not undecoded["decoded"]
    same = want - {"decoded", "sections"}
    assert {k: undecoded[k] for k in same} == {k: info[k] for k in same}


# ---------------------------------------------------------------------------------------------- the header frame


def test_header_dictionary_is_frozen() -> None:
    """Headers decode only with these exact bytes: an edit would misread every 1.0 file."""
    assert hashlib.sha256(P.HEADER_DICT).hexdigest() == P.HEADER_DICT_SHA256
    assert P.HEADER_DICT_SHA256 == "2c5a5c4c13bfc12b4fa0e50786308eaae4cf695a563e6f8f0be8c9bc0fbaa601"
    assert len(P.HEADER_DICT) == 427 and P.HEADER_DICT.isascii()


def grouped_payload(seed: int = 0) -> tuple[P.Payload, np.ndarray]:
    """A 120k pool in 400 folders of 300, 1% kept in clusters of folders, labels mostly the folder's own."""
    rng = np.random.default_rng(seed)
    gid = np.repeat(np.arange(400), 300)
    energy = rng.normal(0, 2, 400)[gid] + rng.normal(0, 1, gid.size)
    idx = np.sort(np.argpartition(energy, 1199)[:1200])
    labels = np.where(rng.random(idx.size) < 0.8, rng.integers(0, 10, 400)[gid[idx]], rng.integers(0, 10, idx.size))
    return P.Payload(FP, gid.size, tuple(f"class-{i}" for i in range(10)), idx, labels, forecast=0.3), gid


def test_header_is_always_one_dictionary_frame() -> None:
    """Every layout, however small, stores its header as one zstd frame made with the dictionary."""
    p_grouped, gid = grouped_payload()
    cases = [
        (P.Payload(FP, 1, ("a",), [], []), None, None),
        (make(300, 40, n_classes=5, seed=7), ZSTD, None),
        (make(10_000, 6_000, seed=1), ZSTD, None),  # bitmap
        (make(10_000, 100, seed=3, forecast=1, receiver="selftrain"), None, None),  # joint
        (p_grouped, None, gid),  # joint, per group
        (make(1000, 20, n_classes=300, forecast=0.05), ZSTD, None),  # u16 labels
    ]
    for p, codecs, groups in cases:
        data = P.encode(p, codecs=codecs, groups=groups)
        magic, version, hlen = PREFIX.unpack_from(data)
        assert magic == P.MAGIC and version == P.FORMAT_VERSION == 0x0100 and data[8:10] == b"\x00\x01"
        stored = data[14 : 14 + hlen]
        params = zstd.get_frame_parameters(stored)
        text = unzip_header(stored)
        header = json.loads(text)
        assert stored[:4] == b"\x28\xb5\x2f\xfd" and params.content_size == len(text)
        assert params.dict_id == 0 and not params.has_checksum
        assert set(header) == HEADER_KEYS and text == canonical(header)
        assert stored == zip_header(text)  # level 19 with the dictionary, as the format says
        with pytest.raises(zstd.ZstdError):  # it really uses the dictionary
            zstd.ZstdDecompressor().decompress(stored)
        assert P.describe(data, groups=groups)["header_bytes"] == hlen
        assert (header["groups"] is not None) == (groups is not None)


def test_header_is_small() -> None:
    """The dictionary is what makes a 1 KB budget carry images: ten class names cost ~130 header bytes."""
    rng = np.random.default_rng(0)
    names = tuple(f"class-{i}" for i in range(10))
    p = P.Payload(FP, 120_000, names, np.sort(rng.choice(120_000, 200, replace=False)), rng.integers(0, 10, 200),
                  forecast=0.4123, receiver="selftrain")
    for codecs in (None, ZSTD):
        data = P.encode(p, codecs=codecs)
        header, _ = unpack(data)
        info = P.describe(data)
        text = canonical(header)
        assert info["header_bytes"] < 140 and info["header_bytes"] < 0.4 * len(text)
        assert info["header_bytes"] < 0.6 * len(zstd.ZstdCompressor(level=19).compress(text))  # the dictionary pays
        assert 14 + info["header_bytes"] + sum(s["stored_bytes"] for s in info["sections"]) + 32 == len(data)
        assert P.decode(data) == p and P.encode(P.decode(data), codecs=codecs) == data


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
        ({"forecast": 1.5}, "forecast must be null or a number in \\[0, 1\\]"),
        ({"forecast": -0.01}, "forecast"),
        ({"forecast": 1.00001}, "forecast"),
        ({"forecast": 2}, "forecast"),
        ({"forecast": True}, "forecast"),
        ({"forecast": False}, "forecast"),
        ({"forecast": np.bool_(True)}, "forecast"),
        ({"forecast": float("nan")}, "forecast"),
        ({"forecast": np.float64("nan")}, "forecast"),
        ({"forecast": float("inf")}, "forecast"),
        ({"forecast": "0.5"}, "forecast"),
        ({"forecast": [0.5]}, "forecast"),
        ({"forecast": 0.5j}, "forecast"),
        ({"receiver": "distill"}, "unknown receiver mode 'distill'"),
        ({"receiver": "Plain"}, "unknown receiver"),
        ({"receiver": ""}, "unknown receiver"),
        ({"receiver": None}, "unknown receiver"),
        ({"receiver": ["plain"]}, "unknown receiver"),
        ({"receiver": b"plain"}, "unknown receiver"),
    ],
)
def test_payload_validation(changes: dict, match: str) -> None:
    fields = {
        "pool_fingerprint": FP,
        "pool_size": 10,
        "class_names": ("a", "b", "c"),
        "indices": [2, 5],
        "labels": [0, 2],
        "forecast": None,
        "receiver": "plain",
    }
    assert P.Payload(**fields).count == 2  # the base case is valid
    with pytest.raises(PayloadError, match=match) as info:
        P.Payload(**{**fields, **changes})
    assert "\n" not in str(info.value)


def test_payload_refuses_a_forecast_too_large_for_a_float() -> None:
    with pytest.raises(PayloadError, match="forecast"):
        P.Payload(FP, 10, ("a",), [], [], forecast=10**400)


def test_payload_is_immutable_and_validated_before_encode() -> None:
    p = make(100, 5, forecast=0.5)
    with pytest.raises(ValueError):
        p.indices[0] = 99
    with pytest.raises(ValueError):
        p.labels[0] = 1
    for name, value in (("forecast", 0.9), ("receiver", "propagate"), ("pool_size", 7)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, name, value)
    assert not hasattr(p, "meta") and "meta" not in {f.name for f in dataclasses.fields(P.Payload)}
    with pytest.raises(PladaError, match="level"):
        P.encode(make(100, 5), level=0)
    with pytest.raises(PladaError, match="needs a Payload"):
        P.encode({"indices": [1]})  # type: ignore[arg-type]
    with pytest.raises(PayloadError, match="header too large"):
        P.encode(P.Payload(FP, 10, tuple("x" * 40 + str(i) for i in range(30_000)), [], []))


# ---------------------------------------------------------------------------------------------- hostile input


def test_good_fixture_decodes(small: tuple[P.Payload, bytes]) -> None:
    p, data = small
    assert P.decode(data) == p
    header, blobs = unpack(data)
    assert header["forecast"] == 0.4321 and header["receiver"] == "selftrain" and header["groups"] is None
    assert pack(header, blobs) == data  # the repack helper is faithful, to the byte
    assert P.decode(pack(header, blobs, level=3)) == p  # any level reads the same


@settings(max_examples=500)
@given(data=st.binary(max_size=300))
def test_random_bytes(data: bytes) -> None:
    reject(data)


@settings(max_examples=500)
@given(tail=st.binary(max_size=300),
       version=st.sampled_from([0, 1, 2, 3, 4, 5, P.FORMAT_VERSION, 0x0101, 0x0200, 0xFFFF]))
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
            elif pos < 10:  # no single flip of 00 01 reaches a draft's 1..4
                v = int.from_bytes(bad[8:10], "little")
                if v == P.PRE_HEAD_VERSION:  # 0.x's pre-release head format: named, as the drafts are
                    assert "pre-release format 1.1" in msg
                else:
                    assert msg == f"unsupported payload format {v >> 8}.{v & 0xFF} (this plada reads format 1.0)"
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
    for version, name in ((0, "0.0"), (5, "0.5"), (7, "0.7"), (0x0102, "1.2"), (0x0200, "2.0"), (0xFFFF, "255.255")):
        other = data[:8] + struct.pack("<H", version) + data[10:]
        assert reject(other) == f"unsupported payload format {name} (this plada reads format 1.0)"
    header, blobs = unpack(data)
    without = {k: v for k, v in header.items() if k != "groups"}
    assert "missing ['groups']" in reject(pack(without, blobs))
    draft_like = {k: v for k, v in header.items() if k not in ("forecast", "receiver")}
    msg = reject(pack({**draft_like, "meta": {}}, blobs))  # a draft's header in a 1.0 file
    assert "missing ['forecast', 'receiver'], unexpected ['meta']" in msg
    assert reject(seal(canonical(header), blobs)) == "header section is not a zstd frame"  # no plain headers
    with pytest.raises(PayloadError, match="must be bytes"):
        P.decode("not bytes")  # type: ignore[arg-type]


# Written by plada 0.x as draft 1 (plain JSON header with `meta`): 1.0 refuses them, saying what they are.
GOLDEN_DRAFT1 = {
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


def test_draft_files_are_refused(small: tuple[P.Payload, bytes], tmp_path, monkeypatch) -> None:
    """Drafts 1-4 of plada 0.x get one line naming them, from every entry point, before anything is inflated."""
    want = ("payload is in draft format {} of plada 0.x; this plada reads format 1.0 "
            "(ask its sender to send it again)")
    seen = only_the_header_inflates(monkeypatch)
    for text in GOLDEN_DRAFT1.values():
        data = bytes.fromhex(text)
        assert data[-32:] == hashlib.sha256(data[:-32]).digest()  # a genuine, intact draft file
        for call in (P.decode, P.peek_header, P.describe, lambda d: P.describe(d, header_only=True)):
            with pytest.raises(PayloadError) as info:
                call(data)
            assert str(info.value) == want.format(1)
        (tmp_path / "old.plada").write_bytes(data)
        with pytest.raises(PayloadError, match=re.escape(want.format(1)) + r".*old\.plada"):
            P.read(tmp_path / "old.plada")
    _, data = small
    for version in P.DRAFT_VERSIONS:
        assert reject(seal(data[14:-32], [], version=version)) == want.format(version)
        assert reject(data[:8] + struct.pack("<H", version) + data[10:]) == want.format(version)  # checksum or not
    assert P.DRAFT_VERSIONS == (1, 2, 3, 4)
    assert seen == []


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
        ({"count": None}, "integer"),
        ({"pool_size": 2**41}, "pool_size"),
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": True}, "integer"),
        ({"pool_size": 100}, "out of range"),  # kept indices reach ~290
        ({"pool_fingerprint": "x" * 64}, "fingerprint"),
        ({"pool_fingerprint": FP.upper()}, "fingerprint"),
        ({"pool_fingerprint": FP[:-1]}, "fingerprint"),
        ({"pool_fingerprint": 5}, "fingerprint"),
        ({"class_names": []}, "class_names"),
        ({"class_names": "abcde"}, "class_names"),
        ({"class_names": ["a", "b", "c", "d", 5]}, "non-empty strings"),
        ({"class_names": ["a", "b", "c", "d", ""]}, "non-empty strings"),
        ({"class_names": ["a", "b", "c", "d", "d"]}, "distinct"),
        ({"class_names": ["a", "b"]}, "label out of range"),
        ({"class_names": [str(i) for i in range(257)]}, "labels codec"),
        ({"forecast": 1.5}, "forecast must be null or a number in \\[0, 1\\], got 1.5"),
        ({"forecast": -1e-9}, "forecast"),
        ({"forecast": 2}, "forecast"),
        ({"forecast": True}, "forecast"),
        ({"forecast": False}, "forecast"),
        ({"forecast": "0.5"}, "forecast"),
        ({"forecast": [0.5]}, "forecast"),
        ({"forecast": {"value": 0.5}}, "forecast"),
        ({"receiver": "distill"},
         "unknown receiver mode 'distill' \\(this plada knows plain, selftrain, propagate, head\\)"),
        ({"receiver": "PLAIN"}, "unknown receiver"),
        ({"receiver": ""}, "unknown receiver"),
        ({"receiver": None}, "unknown receiver"),
        ({"receiver": 0}, "unknown receiver"),
        ({"receiver": ["plain"]}, "unknown receiver"),
        ({"receiver": "plain\nselftrain"}, "unknown receiver"),
        ({"groups": {"count": 2, "sha256": "0" * 64}}, "only a joint section is coded per group"),
        ({"groups": False}, "only a joint section"),
        ({"groups": {}}, "only a joint section"),
        ({"meta": {}}, "unexpected \\['meta'\\]"),
        ({"sections": []}, "sections"),
        ({"sections": "index"}, "sections"),
        ({"sections": None}, "sections"),
        ({"extra": 1}, "unexpected"),
    ],
)
def test_hostile_header_fields(small: tuple[P.Payload, bytes], changes: dict, match: str) -> None:
    reject(_mutated(small, **changes), match)


@pytest.mark.parametrize(
    "changes, forecast, receiver",
    [
        ({"forecast": None}, None, "selftrain"),
        ({"forecast": 0}, 0.0, "selftrain"),
        ({"forecast": 1}, 1.0, "selftrain"),
        ({"forecast": 0.123456789}, 0.1235, "selftrain"),  # a reader rounds what a writer would have
        ({"forecast": 5e-5}, 0.0001, "selftrain"),
        ({"receiver": "plain"}, 0.4321, "plain"),
        ({"receiver": "propagate", "forecast": 0.99}, 0.99, "propagate"),
    ],
)
def test_valid_header_variants(small: tuple[P.Payload, bytes], changes: dict, forecast: object, receiver: str) -> None:
    p = P.decode(_mutated(small, **changes))
    assert p.forecast == forecast and p.receiver == receiver
    assert p == dataclasses.replace(small[0], forecast=forecast, receiver=receiver)


def test_hostile_header_structure(small: tuple[P.Payload, bytes]) -> None:
    header, blobs = unpack(small[1])
    for key in sorted(HEADER_KEYS):
        missing = {k: v for k, v in header.items() if k != key}
        reject(pack(missing, blobs), re.escape(f"missing ['{key}'], unexpected []"))
    reject(pack(dict(header, sections=header["sections"][::-1]), blobs[::-1]),
           re.escape("must be ['index', 'labels'] or ['joint'], got ['labels', 'index']"))
    reject(pack(dict(header, sections=header["sections"] + header["sections"][1:]), [*blobs, blobs[1]]),
           "must list \\[index, labels\\] or \\[joint\\]")
    reject(pack(dict(header, sections=header["sections"][:1]), blobs[:1]), "must be \\['index', 'labels'\\]")
    joint_name = json.loads(json.dumps(header))
    joint_name["sections"][0]["name"] = "joint"
    reject(pack(joint_name, blobs), "must be \\['index', 'labels'\\] or \\['joint'\\]")
    unknown = json.loads(json.dumps(header))
    unknown["sections"][0]["codec"] = "rle"
    reject(pack(unknown, blobs), "unknown index codec 'rle'")
    ranged = json.loads(json.dumps(header))
    ranged["sections"][0]["codec"] = "ctx-range"
    reject(pack(ranged, blobs), "unknown index codec 'ctx-range'")
    wrong_labels = json.loads(json.dumps(header))
    wrong_labels["sections"][1]["codec"] = "u16-zstd"
    reject(pack(wrong_labels, blobs), "labels codec 'u16-zstd' does not fit 5 classes")
    extra_key = json.loads(json.dumps(header))
    extra_key["sections"][0]["offset"] = 0
    reject(pack(extra_key, blobs), "keys")
    not_a_dict = json.loads(json.dumps(header))
    not_a_dict["sections"][1] = ["labels", "u8-zstd", 28]
    reject(pack(not_a_dict, blobs), "keys")
    for length in (-1, 10**18, "12", None, 12.0, True):
        bad = json.loads(json.dumps(header))
        bad["sections"][0]["length"] = length
        reject(pack(bad, blobs, fix_lengths=False))
    text = canonical(header)
    assert b'"forecast":0.4321' in text and b'"count":40' in text
    reject(pack(b"[1,2]", blobs), "JSON object")
    reject(pack(b'"header"', blobs), "JSON object")
    reject(pack(b"\xff" + text, blobs), "UTF-8")
    reject(pack(text[:-1], blobs), "not valid JSON")
    reject(pack(b"", blobs), "not valid JSON")
    reject(pack(text.replace(b'"forecast":0.4321', b'"forecast":NaN'), blobs), "NaN")
    reject(pack(text.replace(b'"forecast":0.4321', b'"forecast":Infinity'), blobs), "Infinity")
    reject(pack(text.replace(b'"forecast":0.4321', b'"forecast":-Infinity'), blobs), "Infinity")
    reject(pack(text.replace(b'"forecast":0.4321', b'"forecast":1e999'), blobs), "forecast")  # parses as inf
    reject(pack(text.replace(b'"forecast":0.4321', b'"forecast":1' + b"0" * 400), blobs))  # too big for a float
    reject(pack(text.replace(b'"count":40', b'"count":40,"count":40'), blobs), "duplicated")
    reject(pack(text.replace(b'"receiver":"selftrain"', b'"receiver":"selftrain","receiver":"plain"'), blobs),
           "duplicated")
    reject(pack(text.replace(b'"name":"index"', b'"name":"index","name":"index"'), blobs), "duplicated")
    digits = text.replace(b'"pool_size":300', b'"pool_size":' + b"9" * 5000)  # past int-parsing limit
    reject(pack(digits, blobs), "JSON")
    deep = b"[" * 200_000 + b"]" * 200_000
    reject(pack(text.replace(b'"forecast":0.4321', b'"forecast":' + deep), blobs), "nested too deeply")
    deep_objects = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    reject(pack(text.replace(b'"receiver":"selftrain"', b'"receiver":' + deep_objects), blobs), "nested too deeply")
    # Whitespace and key order are the writer's business: a reader accepts any JSON text that passes the checks.
    loose = json.dumps(header, indent=2).encode()
    assert P.decode(pack(loose, blobs)) == small[0]


def test_hostile_lengths(small: tuple[P.Payload, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    header, blobs = unpack(small[1])
    text = canonical(header)
    stored = zip_header(text)
    cut = pack(header, [blobs[0], blobs[1][:-1]], fix_lengths=False)
    trailing = pack(header, [blobs[0], blobs[1] + b"junk"], fix_lengths=False)
    swollen = json.loads(json.dumps(header))
    swollen["sections"][0]["length"] += 1  # the sum exceeds the file by one byte
    total = len(blobs[0]) + len(blobs[1])
    reject(trailing, f"payload has trailing bytes: header declares {total} section bytes, file has {total + 4}")
    reject(cut, f"payload truncated: header declares {total} section bytes, file has {total - 1}")
    reject(pack(swollen, blobs, fix_lengths=False), "truncated")
    reject(seal(stored, blobs, header_len=2**32 - 1), "exceeds")
    reject(seal(stored, blobs, header_len=P.MAX_HEADER_BYTES + 1), "exceeds")
    reject(seal(stored, blobs, header_len=P.MAX_HEADER_BYTES), "runs past the end")
    reject(seal(stored, blobs, header_len=len(stored) - 1), "header section is corrupt")
    reject(seal(stored, blobs, header_len=len(stored) + 1), "header section is corrupt")
    reject(seal(stored, blobs, header_len=0), "header section is not a zstd frame")
    huge = json.loads(json.dumps(header))
    huge["sections"][0]["length"] = 2**40
    huge["sections"][1]["length"] = -(2**40) + len(blobs[0]) + len(blobs[1])
    reject(pack(huge, blobs, fix_lengths=False), "non-negative")
    # The length sum is a header check: peek_header and a header-only describe refuse it too, inflating nothing.
    seen = only_the_header_inflates(monkeypatch)
    for data, match in ((trailing, "trailing bytes"), (cut, "truncated")):
        for call in (P.peek_header, lambda d: P.describe(d, header_only=True)):
            with pytest.raises(PayloadError, match=match):
                call(data)
    assert P.peek_header(small[1])["count"] == 40
    assert seen and set(seen) == {"header"}


HEADER_SLOTS = [(None, k) for k in sorted(HEADER_KEYS)]
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
        assert result.receiver in P.RECEIVERS and (result.forecast is None or 0 <= result.forecast <= 1)
        assert P.decode(P.encode(result)) == result


@settings(max_examples=200, deadline=1000)
@given(raw=st.binary(max_size=400), compress=st.booleans())
def test_fuzzed_header_frames(small: tuple[P.Payload, bytes], raw: bytes, compress: bool) -> None:
    """Arbitrary stored header bytes, raw or as a dictionary frame, under a valid checksum."""
    _, blobs = unpack(small[1])
    try:
        result = P.decode(seal(zip_header(raw, 3) if compress else raw, blobs))
    except PayloadError as e:
        assert "\n" not in str(e)
    else:
        assert result.count == 40


@settings(max_examples=200, deadline=1000)
@given(forecast=json_values, receiver=json_values, groups=json_values)
def test_fuzzed_forecast_receiver_groups(small: tuple[P.Payload, bytes], forecast: object, receiver: object,
                                         groups: object) -> None:
    """The three 1.0 fields at once: valid only when each is, and then exactly as stored (forecast rounded)."""
    header, blobs = unpack(small[1])
    header.update(forecast=forecast, receiver=receiver, groups=groups)
    ok = (groups is None and receiver in P.RECEIVERS
          and (forecast is None or (type(forecast) in (int, float) and 0 <= forecast <= 1)))
    try:
        result = P.decode(pack(header, blobs))
    except PayloadError as e:
        assert "\n" not in str(e) and not ok
    else:
        assert ok and result.receiver == receiver
        assert result.forecast == (None if forecast is None else round(float(forecast), P.FORECAST_DIGITS))


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
        P.Payload(FP, 10, ("a",), [5, 4], [0, 0])


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


def test_hostile_header_frames(small: tuple[P.Payload, bytes]) -> None:
    """The stored header is bounded like a section: a bomb or a lying frame is never inflated."""
    header, blobs = unpack(small[1])
    text = canonical(header)
    good = zip_header(text)
    assert seal(good, blobs) == small[1]
    bomb = zip_header(text[:-1] + b" " * 50_000_000 + b"}", 3)
    assert len(bomb) < 10_000
    over = zip_header(text[:-1] + b" " * (P.MAX_HEADER_BYTES - len(text) + 1) + b"}", 3)  # one byte over 1 MiB
    checked = bytearray(zip_header(text, write_checksum=True))
    checked[-1] ^= 1
    cases = [
        (bomb, re.escape(f"header section declares {len(text) + 50_000_000} decompressed bytes, expected 0..1048576")),
        (over, "declares 1048577 decompressed bytes"),
        (_patch_content_size(good, len(text) + 1), "header section is corrupt"),
        (_patch_content_size(good, len(text) - 1), "header section is corrupt"),
        (zip_header(text, write_content_size=False), "header section's zstd frame does not declare its"),
        (bytes(checked), "header section is corrupt"),
        (good + b"\x00", "header section is corrupt"),
        (good + good, "header section is corrupt"),
        (good[:-1], "header section is corrupt"),
        (good[:4], "header section has a bad zstd frame header"),
        (text, "header section is not a zstd frame"),
        (b"", "header section is not a zstd frame"),
        (b"\x50\x2a\x4d\x18" + struct.pack("<I", len(good)) + good, "header section is not a zstd frame"),  # skippable
        (zip_header(b"\xff" + text), "UTF-8"),
        (zip_header(text[:-1]), "not valid JSON"),
        (zip_header(b"[]"), "JSON object"),
        (zip_header(b""), "not valid JSON"),
    ]
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for stored, match in cases:
            reject(seal(stored, blobs), match)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0
    assert peak < 20_000_000  # the 50 MB bomb was never inflated
    max_ok = zip_header(text[:-1] + b" " * (P.MAX_HEADER_BYTES - len(text)) + b"}", 3)
    assert zstd.get_frame_parameters(max_ok).content_size == P.MAX_HEADER_BYTES
    assert P.decode(seal(max_ok, blobs)) == small[0]  # exactly 1 MiB of JSON is allowed


def _with_window(frame: bytes, window_descriptor: int) -> bytes:
    """A single-segment frame rewritten to state a window (and a 4-byte content size): same blocks, same content."""
    desc = frame[4]
    fcs_len = {0: (desc >> 5) & 1, 1: 2, 2: 4, 3: 8}[desc >> 6]
    assert (desc >> 5) & 1 and desc & 3 == 0  # single segment, no dictionary ID
    size = zstd.get_frame_parameters(frame).content_size
    return frame[:4] + bytes([(2 << 6) | (desc & 0x1C), window_descriptor]) + size.to_bytes(4, "little") + \
        frame[5 + fcs_len :]


def test_frames_needing_a_window_over_128_mib_are_refused(small: tuple[P.Payload, bytes]) -> None:
    header, blobs = unpack(small[1])
    stored = zip_header(canonical(header))
    ok = _with_window(stored, 0x50)  # a 1 MiB window: allowed
    assert zstd.get_frame_parameters(ok).window_size == 1 << 20 and P.decode(seal(ok, blobs)) == small[0]
    wide = _with_window(stored, 0xA8)  # 2 GiB
    assert zstd.get_frame_parameters(wide).window_size == 1 << 31
    reject(seal(wide, blobs), "header section")
    reject(pack(header, [blobs[0], _with_window(blobs[1], 0xA8)]), "labels section")


def test_bitmap_bomb_costs_its_bitmap_not_ten_times_more() -> None:
    """A few-KB file whose bitmap inflates to the most the header's count allows, every bit set."""
    count = 20_000
    nbytes = P.BITMAP_RATIO * P.MAX_VARINT_BYTES * count + P.BITMAP_SLACK
    idx_blob = P._compress(b"\xff" * nbytes, 19)
    lab_blob = P._compress(b"\x00" * count, 19)
    header = {"pool_fingerprint": "ab" * 32, "pool_size": nbytes * 8, "class_names": ["a", "b"], "count": count,
              "groups": None, "forecast": None, "receiver": "plain",
              "sections": [{"name": "index", "codec": "bitmap-zstd", "length": len(idx_blob)},
                           {"name": "labels", "codec": "u8-zstd", "length": len(lab_blob)}]}
    data = P._assemble(header, [idx_blob, lab_blob])
    assert data == pack(header, [idx_blob, lab_blob])
    assert len(data) < 1000
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError, match="bits set"):
            P.decode(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * nbytes  # was 18x the bitmap when it was unpacked whole


# ---------------------------------------------------------------------------------------------- files


def test_write_read_atomic(tmp_path) -> None:
    p = make(10_000, 500, seed=11, forecast=0.8, receiver="propagate")
    target = tmp_path / "set.plada"
    n = P.write(target, p)
    assert n == target.stat().st_size == len(P.encode(p))
    assert os.listdir(tmp_path) == ["set.plada"]
    assert P.read(target) == p
    q = make(10_000, 20, seed=12)
    P.write(str(target), q)
    assert os.listdir(tmp_path) == ["set.plada"]
    assert P.read(str(target)) == q
    assert P.write_bytes(target, P.encode(p)) == n and P.read(target) == p


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


# ---------------------------------------------------------------------------------------------- joint section


def test_smallest_codec_wins() -> None:
    p_grouped, gid = grouped_payload()
    cases = [
        (make(10_000, 6_000, seed=1), None),
        (make(10_000, 10, seed=1), None),
        (make(300, 40, n_classes=5, seed=7), None),
        (make(1000, 0), None),
        (p_grouped, gid),
        (p_grouped, None),
        (P.Payload(FP, 5000, ("a", "b"), np.arange(1000, 3000), [0] * 2000), None),
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
        winner = "ctx-range" if is_joint(info) else info["sections"][0]["codec"]
        assert sizes[winner] == len(data)
        if min(sizes["gap-zstd"], sizes.get("bitmap-zstd", 1 << 60)) <= sizes["ctx-range"]:
            assert not is_joint(info)  # ties go to the zstd sections
        assert P.decode(data, groups=groups) == p
    with pytest.raises(PladaError, match="codecs"):
        P.encode(make(100, 5), codecs=("rle",))
    with pytest.raises(PladaError, match="codecs"):
        P.encode(make(100, 5), codecs="gap-zstd")


NEEDS_POOL = "this payload was coded per folder of its pool \\(400 groups\\): decoding it needs the pool"


def test_grouped_payload_needs_the_same_grouping(tmp_path) -> None:
    p, gid = grouped_payload()
    data = P.encode(p, groups=gid)
    info = P.describe(data, groups=gid)
    assert is_joint(info) and info["groups"]["count"] == 400 and info["forecast"] == 0.3
    assert [(s["name"], s["codec"], s["entries"]) for s in info["sections"]] == [("joint", "ctx-range", 1200)]
    assert 14 + info["header_bytes"] + info["sections"][0]["stored_bytes"] + 32 == len(data)
    assert P.decode(data, groups=gid) == p
    assert P.decode(data, groups=gid * 7 + 3) == p  # only the partition matters, not the ids
    assert len(data) < len(P.encode(p)) <= len(P.encode(p, codecs=ZSTD))  # the folders help
    reject(data, NEEDS_POOL)
    with pytest.raises(PayloadError, match="different grouping"):
        P.decode(data, groups=np.repeat(np.arange(200), 600))
    with pytest.raises(PayloadError, match="groups"):
        P.decode(data, groups=gid[:-1])
    target = tmp_path / "grouped.plada"
    assert P.write(target, p, groups=gid) == len(data) == target.stat().st_size
    assert P.read(target, groups=gid) == p
    with pytest.raises(PayloadError, match=NEEDS_POOL + ".*grouped.plada"):
        P.read(target)
    with pytest.raises(PayloadError, match="groups"):
        P.encode(p, groups=gid[:-1])  # checked even though it would be used only by the joint codec
    undecoded = P.describe(data)  # without the groups: the header and sizes, and a note saying why
    assert not undecoded["decoded"] and "--pool" in undecoded["note"] and undecoded["groups"] == info["groups"]


def test_joint_payload_without_groups() -> None:
    p = make(10_000, 100, seed=3)
    data = P.encode(p)
    info = P.describe(data)
    assert is_joint(info) and info["groups"] is None
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
        ({"groups": {"count": 400, "sha256": "0" * 64, "x": 1}}, "'groups' must be null or have exactly"),
        ({"groups": {"count": 1, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": 10**6, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": True, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": 400.0, "sha256": "0" * 64}}, "out of range"),
        ({"groups": {"count": 400, "sha256": "A" * 64}}, "sha256"),
        ({"groups": {"count": 400, "sha256": "0" * 64}}, "different grouping"),
        ({"groups": {"count": 401, "sha256": None}}, "sha256"),
        ({"groups": None}, None),  # decodes the stream without its groups: garbage or an error
        ({"count": P.codec.MAX_COUNT + 1, "pool_size": 2**30}, "joint codec not allowed"),
        ({"pool_size": 2**31 + 1}, "joint codec not allowed"),
        ({"count": 1201}, "count"),
        ({"forecast": 1.01}, "forecast"),
        ({"receiver": "joint"}, "unknown receiver"),
        ({"sections": []}, "must list \\[index, labels\\] or \\[joint\\]"),
        ({"sections": [{"name": "index", "codec": "ctx-range", "length": 0}]}, "must be \\['index', 'labels'\\]"),
        ({"sections": [{"name": "joint", "codec": "ctx-range", "length": 0}] * 2}, "got \\['joint', 'joint'\\]"),
        ({"sections": [{"name": "joint", "codec": "ctx-ans", "length": 0}]}, "unknown joint codec"),
        ({"sections": [{"name": "joint", "codec": "gap-zstd", "length": 0}]}, "unknown joint codec"),
        ({"sections": [{"name": "joint", "codec": "ctx-range", "length": 0, "x": 1}]}, "keys"),
        ({"class_names": ["a", "b"]}, None),  # a different class count reads the stream differently
    ],
)
def test_hostile_joint_headers(joint: tuple, changes: dict, match: str | None) -> None:
    _, gid, data = joint
    header, blobs = unpack(data)
    header.update(changes)
    try:
        P.decode(pack(header, blobs), groups=gid)
    except PayloadError as e:
        assert "\n" not in str(e) and (match is None or re.search(match, str(e)))
    else:
        assert match is None


def test_hostile_joint_structure(joint: tuple) -> None:
    p, gid, data = joint
    header, blobs = unpack(data)
    reject_grouped(pack({k: v for k, v in header.items() if k != "groups"}, blobs), gid, "missing \\['groups'\\]")
    reject_grouped(pack({**header, "meta": {}}, blobs), gid, "unexpected \\['meta'\\]")
    reject_grouped(pack(header, [blobs[0][:-1]]), gid, "32-bit words")
    reject_grouped(pack(header, [blobs[0][:-4]]), gid)
    reject_grouped(pack(header, [blobs[0] + b"\x00" * 8]), gid, "trailing")
    reject_grouped(pack(header, [blobs[0] + b"\x00" * 4]), gid, "trailing")  # one word once slipped through
    reject_grouped(pack(header, [blobs[0] + b"\x9d\x3c\x51\xe7"]), gid, "trailing")
    reject_grouped(pack(header, [b""]), gid)
    reject_grouped(pack(header, [blobs[0]], fix_lengths=False)[:-40] + data[-32:], gid, "checksum")
    assert P.decode(pack(header, blobs), groups=gid) == p


def test_joint_section_refuses_any_extra_word(joint: tuple) -> None:
    """A joint section must be exactly the coder's sealed words: an appended word, zero or not, is refused."""
    p, gid, data = joint
    cases = [(gid, data), (None, P.encode(make(10_000, 100, seed=3))),
             (None, P.encode(example())), (None, P.encode(make(50, 49, n_classes=3, seed=2)))]
    rng = np.random.default_rng(0)
    for groups, good in cases:
        header, blobs = unpack(good)
        assert header["sections"][0]["name"] == "joint"
        assert P.decode(pack(header, blobs), groups=groups) == P.decode(good, groups=groups)
        words = [b"\x00" * 4, b"\xff" * 4, b"\x01\x00\x00\x00"] + [rng.bytes(4) for _ in range(5)]
        for word in words:
            for blob in (blobs[0] + word, word + blobs[0]):
                with pytest.raises(PayloadError, match="joint section") as info:
                    P.decode(pack(header, [blob]), groups=groups)
                assert "\n" not in str(info.value)


@settings(max_examples=200, deadline=2000)
@given(raw=st.binary(max_size=800), words=st.booleans())
def test_fuzzed_joint_sections(joint: tuple, raw: bytes, words: bool) -> None:
    """Arbitrary joint bytes under a valid checksum decode to a valid Payload or a PayloadError."""
    _, gid, data = joint
    header, _ = unpack(data)
    blob = raw[: len(raw) // 4 * 4] if words else raw
    try:
        result = P.decode(pack(header, [blob]), groups=gid)
    except PayloadError as e:
        assert "\n" not in str(e)
    else:
        assert result.count == 1200 and P.decode(P.encode(result, groups=gid), groups=gid) == result
        reject_grouped(pack(header, [blob + b"\x00" * 4]), gid, "trailing")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(0, 2**31))
def test_groups_never_make_a_payload_bigger(k: int, seed: int) -> None:
    """Giving the pool's groups only adds candidates: a few images cost no more than without them."""
    rng = np.random.default_rng(seed)
    n = 20_000
    groups = np.repeat(np.arange(400), 50)
    idx = np.sort(rng.choice(n, k, replace=False))
    p = P.Payload(FP, n, ("a", "b", "c"), idx, rng.integers(0, 3, k), forecast=0.5, receiver="selftrain")
    with_groups = P.encode(p, groups=groups)
    assert len(with_groups) <= len(P.encode(p))
    assert P.decode(with_groups, groups=groups) == p
