"""Tests for the context codec: exact round trips, size against the reference (`benchmarks.bits`), hostile streams."""

from __future__ import annotations

import hashlib
import math
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.bits import ideal_bits, model_bits
from plada import codec as C
from plada.errors import PayloadError


def round_trip(idx: np.ndarray, lab: np.ndarray, n: int, n_classes: int, groups: object) -> bytes:
    data = C.encode(idx, lab, n, n_classes, groups)
    got_idx, got_lab = C.decode(data, idx.size, n, n_classes, groups)
    assert got_idx.dtype == np.int64 and np.array_equal(got_idx, idx)
    assert np.array_equal(got_lab, lab)
    assert C.encode(idx, lab, n, n_classes, groups) == data  # deterministic
    return data


def sizes_summing_to(rng: np.random.Generator, n: int, g: int) -> np.ndarray:
    """g positive sizes adding up to exactly n, lognormally varied like real folders."""
    raw = rng.lognormal(0.0, 0.6, g)
    sizes = np.maximum(1, np.floor(raw / raw.sum() * (n - g)).astype(np.int64) + 1)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    assert sizes.min() >= 1 and sizes.sum() == n
    return sizes


def clustered(rng: np.random.Generator, gid: np.ndarray, k: int, spread: float = 2.0) -> np.ndarray:
    """The k lowest 'energies', where a group's shared offset makes some groups far likelier."""
    energy = rng.normal(0, spread, int(gid.max()) + 1)[gid] + rng.normal(0, 1, gid.size)
    return np.sort(np.argpartition(energy, k - 1)[:k]) if k else np.zeros(0, np.int64)


def skewed_labels(rng: np.random.Generator, gid: np.ndarray, idx: np.ndarray, n_classes: int, purity: float = 0.8):
    """Mostly each group's own majority class (Zipf-distributed over classes), sometimes any class."""
    major = np.minimum(rng.zipf(1.5, int(gid.max()) + 1) - 1, n_classes - 1)
    noise = np.minimum(rng.zipf(1.5, idx.size) - 1, n_classes - 1)
    return np.where(rng.random(idx.size) < purity, major[gid[idx]], noise).astype(np.int64)


# ---------------------------------------------------------------------------------------------- round trips


@st.composite
def selections(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray | None]:
    lo, hi = draw(st.sampled_from([(1, 40), (41, 3000), (3001, 60_000)]))
    n = draw(st.integers(lo, hi))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["none", "one", "runs", "scattered", "singletons"]))
    g = draw(st.integers(1, max(1, min(n, 400))))
    if kind == "none":
        groups = None
    elif kind == "one":
        groups = np.full(n, 7)
    elif kind == "runs":
        ids = rng.permutation(g) * 3 + 5  # arbitrary, non-contiguous ids, each one run
        groups = np.repeat(ids, sizes_summing_to(rng, n, g))
    elif kind == "scattered":
        groups = rng.integers(0, g, n)
    else:
        groups = np.arange(n)[::-1]
    gid = np.zeros(n, np.int64) if groups is None else np.unique(groups, return_inverse=True)[1].reshape(-1)
    shape = draw(st.sampled_from(["random", "empty", "all", "whole-groups", "clustered", "run", "one"]))
    k = draw(st.integers(0, n))
    if shape == "random":
        idx = np.sort(rng.choice(n, size=k, replace=False))
    elif shape == "empty":
        idx = np.zeros(0, np.int64)
    elif shape == "all":
        idx = np.arange(n)
    elif shape == "whole-groups":
        chosen = rng.random(int(gid.max()) + 1) < 0.3
        idx = np.flatnonzero(chosen[gid])
    elif shape == "clustered":
        idx = clustered(rng, gid, k)
    elif shape == "run":
        start = int(rng.integers(0, n - k + 1))
        idx = np.arange(start, start + k)
    else:
        idx = np.array([int(rng.integers(0, n))])
    n_classes = draw(st.sampled_from([1, 2, 3, 5, 10, 257, 65535]) | st.integers(1, 300))
    label_kind = draw(st.sampled_from(["uniform", "one", "skewed"]))
    if label_kind == "uniform":
        lab = rng.integers(0, n_classes, idx.size)
    elif label_kind == "one":
        lab = np.full(idx.size, n_classes - 1)
    else:
        lab = skewed_labels(rng, gid, idx, n_classes)
    return idx.astype(np.int64), lab.astype(np.int64), n, n_classes, groups


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sel=selections())
def test_round_trip_property(sel: tuple) -> None:
    idx, lab, n, n_classes, groups = sel
    data = round_trip(idx, lab, n, n_classes, groups)
    assert len(data) % 4 == 0
    # The coder adds at most a few words to the model's own code length.
    model = model_bits(idx, lab, n_classes, groups, pool_size=n)["total"]
    assert len(data) * 8 <= model * 1.01 + 96


@pytest.mark.parametrize("n_classes", [1, 2, 1000])
@pytest.mark.parametrize("groups", ["none", "one", "many", "singletons"])
@pytest.mark.parametrize("shape", ["empty", "all", "one", "one-missing", "half"])
def test_edge_cases(n_classes: int, groups: str, shape: str) -> None:
    n = 1000
    rng = np.random.default_rng(1)
    g = {
        "none": None,
        "one": np.zeros(n, np.int64),
        "many": np.repeat(np.arange(50), 20),
        "singletons": np.arange(n),
    }[groups]
    idx = {
        "empty": np.zeros(0, np.int64),
        "all": np.arange(n),
        "one": np.array([617]),
        "one-missing": np.delete(np.arange(n), 617),
        "half": np.sort(rng.choice(n, n // 2, replace=False)),
    }[shape]
    lab = rng.integers(0, n_classes, idx.size)
    data = round_trip(idx, lab, n, n_classes, g)
    if shape == "empty" or (shape == "all" and n_classes == 1):
        assert data == b""  # nothing to say: the header's count settles it


def test_tiny_pools() -> None:
    """Every subset of pools up to 6 images, under three groupings."""
    for n in range(1, 7):
        for mask in range(1 << n):
            idx = np.flatnonzero([(mask >> i) & 1 for i in range(n)])
            lab = (idx * 7) % 3
            for groups in (None, np.arange(n) % 2, np.arange(n) // 3):
                got = C.decode(C.encode(idx, lab, n, 3, groups), idx.size, n, 3, groups)
                assert np.array_equal(got[0], idx) and np.array_equal(got[1], lab)


def test_large_counts_are_fast() -> None:
    """An ImageNet-21K-shaped pool keeping a million images, clustered, 1000 skewed classes."""
    rng = np.random.default_rng(21)
    n, g, k = 14_197_122, 21_841, 1_000_000
    gid = np.repeat(np.arange(g), sizes_summing_to(rng, n, g))
    idx = clustered(rng, gid, k)
    lab = skewed_labels(rng, gid, idx, 1000)
    groups = C.grouping(gid, n)
    start = time.perf_counter()
    data = C.encode(idx, lab, n, 1000, groups)
    mid = time.perf_counter()
    got_idx, got_lab = C.decode(data, k, n, 1000, groups)
    end = time.perf_counter()
    assert np.array_equal(got_idx, idx) and np.array_equal(got_lab, lab)
    assert mid - start < 60 and end - mid < 30  # generous: this machine's CPUs are shared
    assert len(data) * 8 <= model_bits(idx, lab, 1000, groups)["total"] * 1.002 + 96


# ---------------------------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_size_near_reference_on_a_realistic_pool(seed: int) -> None:
    """120k images in 400 folders of 300, 1% kept and clustered, labels skewed within folders."""
    rng = np.random.default_rng(seed)
    n, g = 120_000, 400
    gid = np.repeat(np.arange(g), n // g)
    idx = clustered(rng, gid, n // 100)
    lab = skewed_labels(rng, gid, idx, 10)
    data = round_trip(idx, lab, n, 10, gid)
    ideal = ideal_bits(idx, lab, 10, gid)
    model = model_bits(idx, lab, 10, gid)["total"]
    assert len(data) * 8 <= ideal * 1.02 + 64
    assert len(data) * 8 <= model * 1.005 + 64  # the range coder itself costs almost nothing
    # Without folders the same selection still comes within 2% of its one-group reference.
    flat = round_trip(idx, lab, n, 10, None)
    assert len(flat) * 8 <= ideal_bits(idx, lab, 10, None, pool_size=n) * 1.02 + 64
    assert len(data) < len(flat)  # and the folders help


def test_wide_nodes_use_windows_and_escapes() -> None:
    """Tables are capped: far-off counts escape to a uniform tail; huge U-shaped label splits go uniform."""
    n = 200_000
    half = np.arange(n // 2)  # a structured selection: its root split is ~700 sd from the mean
    data = round_trip(half, np.zeros(half.size, np.int64), n, 2, None)
    assert len(data) < 64  # an escape costs ~24 bits; the hypergeometric model alone would want ~200k
    rng = np.random.default_rng(2)
    idx = np.sort(rng.choice(n, 70_000, replace=False))
    lab = (rng.random(idx.size) < 0.3).astype(np.int64)  # two classes: a U-shaped split of 70k labels
    round_trip(idx, lab, n, 2, None)
    calls = []
    real = C._hyper_table

    def spy(width: int, p: dict) -> np.ndarray:
        calls.append(width)
        return real(width, p)

    C._hyper_table = spy
    try:
        round_trip(np.sort(rng.choice(n, n // 2, replace=False)), np.zeros(n // 2, np.int64), n, 1, None)
    finally:
        C._hyper_table = real
    assert max(calls) <= 2 * C._HALF_WINDOW + 3 and max(calls) < 4096  # a 6-sd window, not 100k cells


def test_prior_adapts_to_pure_groups() -> None:
    """Whole folders with one label each cost a few bits per folder, where KT would cost hundreds."""
    rng = np.random.default_rng(3)
    gid = np.repeat(np.arange(400), 300)
    keep = rng.random(400) < 0.1
    idx = np.flatnonzero(keep[gid])
    lab = rng.integers(0, 1000, 400)[gid[idx]]
    data = round_trip(idx, lab, gid.size, 1000, gid)
    parts = model_bits(idx, lab, 1000, gid)
    assert parts["label_prior"] != {"kind": "symmetric", "exponent": 1}  # not KT
    assert len(data) * 8 < 16 * keep.sum() + 400  # about log2(1000) + 1 per kept folder, plus the types
    assert ideal_bits(idx, lab, 1000, gid) > 50 * len(data) * 8


def test_tables_match_exact_distributions() -> None:
    """The deterministic ratio-product tables equal the lgamma pmfs, U-shaped beta-binomials included."""
    rng = np.random.default_rng(0)
    lg = math.lgamma
    for _ in range(300):
        n = int(rng.integers(2, 3000))
        nl, nr, k = n >> 1, n - (n >> 1), int(rng.integers(1, n))
        lo, hi = max(0, k - nr), min(k, nl)
        arr = {x: np.array([v]) for x, v in dict(k=k, nl=nl, nr=nr, lo=lo, hi=hi).items()}
        arr["mode"] = C._hyper_mode(arr["k"], arr["nl"], arr["nr"], arr["lo"], arr["hi"])
        table = C._hyper_table(1 << (hi - lo).bit_length(), arr)[0]
        j = np.arange(lo, hi + 1)
        exact = np.array([-lg(x + 1) - lg(nl - x + 1) - lg(k - x + 1) - lg(nr - k + x + 1) for x in j])
        exact = np.exp(exact - exact.max())
        assert table.max() == 1.0 and not table[hi - lo + 1 :].any()
        ok = exact > 1e-250
        np.testing.assert_allclose(table[: hi - lo + 1][ok], exact[ok], rtol=1e-9)
    for i in range(300):
        m, d = int(rng.integers(1, 600)), 1 << int(rng.integers(1, 9))
        cn = int(rng.integers(2, 5)) if i % 2 else int(rng.integers(2, 60))
        cl, cr = (cn // 2, cn - cn // 2) if i % 3 else (cn - cn // 2, cn // 2)
        params = {x: np.array([v]) for x, v in dict(m=m, cl=cl, cr=cr, d=d, lo=0, hi=m).items()}
        params.update(C._beta_binomial_shape(params["m"], params["cl"], params["cr"], params["d"]))
        table = C._beta_binomial_table(1 << m.bit_length(), params)[0]
        a, b = cl / d, cr / d
        exact = np.array([lg(j + a) + lg(m - j + b) - lg(j + 1) - lg(m - j + 1) for j in range(m + 1)])
        exact = np.exp(exact - exact.max())
        assert table.max() == pytest.approx(1.0) and not table[m + 1 :].any()
        ok = exact > 1e-250
        np.testing.assert_allclose(table[: m + 1][ok], exact[ok], rtol=1e-9)


def test_golden_streams() -> None:
    """The bytes are the format: a change to the model or its tables must show up here."""
    gid = np.repeat(np.arange(6), [5, 9, 1, 20, 3, 12])
    idx = np.array([0, 3, 4, 6, 7, 8, 13, 14, 20, 21, 22, 23, 24, 25, 26, 27, 28, 36, 41, 42, 45])
    lab = np.array([2, 2, 0, 1, 1, 1, 1, 4, 3, 3, 3, 3, 3, 3, 3, 0, 3, 4, 2, 2, 2])
    assert round_trip(idx, lab, gid.size, 5, gid).hex() == "17363ef5b0efed2ca67b0218"
    # A bigger one, built from arithmetic only (no RNG) so it is the same on every numpy.
    i = np.arange(3000)
    gid = np.cumsum((i * 7919) % 97 == 0)
    h = (i * 2654435761) % 2**32
    idx = np.flatnonzero((h < 2**32 // 9) | ((gid % 5 == 0) & (h < 2**31)) | (gid == 3))
    lab = np.where(gid[idx] % 3 == 0, gid[idx] % 7, (idx * 31) % 7)
    grouped = round_trip(idx, lab, i.size, 7, gid)
    flat = round_trip(idx, lab, i.size, 7, None)
    assert (len(grouped), hashlib.sha256(grouped).hexdigest()) == (384, GOLDEN_GROUPED)
    assert (len(flat), hashlib.sha256(flat).hexdigest()) == (488, GOLDEN_FLAT)
    # Folder-blind selection (positions coded as one subset) and skewed labels (the global-share prior).
    idx = np.flatnonzero(h < 2**32 // 7)
    lab = np.where((idx * 40503) % 1000 < 600, 3, (idx * 13) % 50)
    parts = model_bits(idx, lab, 50, gid)
    assert parts["positions_flat"] and parts["label_prior"]["kind"] == "global"
    skewed = round_trip(idx, lab, i.size, 50, gid)
    assert (len(skewed), hashlib.sha256(skewed).hexdigest()) == (416, GOLDEN_SKEWED)


GOLDEN_GROUPED = "7d586eb80aba189e31c759e8afc0bb026567bf0c2a04b69e4b669133ef371797"
GOLDEN_FLAT = "4e5af08f6815d98227f9eb8ca061a6bbef1a6fadef96daaea082cdda1bca8b58"
GOLDEN_SKEWED = "756b3a4b1cfc399580392eae1c94c5649431f16dd4a761fc15771fc8a3af298d"


# ---------------------------------------------------------------------------------------------- groups


def test_grouping_depends_only_on_the_partition() -> None:
    rng = np.random.default_rng(5)
    runs = np.repeat(np.arange(30), rng.integers(1, 40, 30))
    relabelled = (runs * 13 + 1000)[::1]
    assert C.grouping(runs, runs.size).digest == C.grouping(relabelled, runs.size).digest
    assert C.grouping(runs, runs.size).members is None
    scattered = rng.integers(0, 30, 500)
    perm = rng.permutation(30)
    a, b = C.grouping(scattered, 500), C.grouping(perm[scattered], 500)
    assert a.members is not None and a.digest == b.digest and np.array_equal(a.members, b.members)
    assert a.digest != C.grouping(np.sort(scattered), 500).digest
    merged = runs.copy()
    merged[merged == 1] = 0
    assert C.grouping(merged, runs.size).digest != C.grouping(runs, runs.size).digest
    one = C.grouping(None, 10)
    assert one.count == 1 and one.digest == C.grouping(np.full(10, 3), 10).digest
    for bad in (np.zeros(9, np.int64), np.zeros(10, np.float64), np.zeros((2, 5), np.int64)):
        with pytest.raises(PayloadError, match="groups"):
            C.grouping(bad, 10)
    with pytest.raises(PayloadError, match="groups cover"):
        C.grouping(C.grouping(None, 11), 10)


def test_scattered_groups_match_their_runs_version() -> None:
    """Coding only sees the partition: a permuted pool with the same folders costs the same, to a word."""
    rng = np.random.default_rng(8)
    gid = np.repeat(np.arange(40), 50)
    idx = clustered(rng, gid, 100)
    lab = skewed_labels(rng, gid, idx, 20)
    perm = rng.permutation(gid.size)  # image i of the permuted pool is image perm[i] of the original
    inv = np.argsort(perm)
    pidx = np.sort(inv[idx])
    plab = np.empty_like(lab)
    plab[np.searchsorted(pidx, inv[idx])] = lab
    a = round_trip(idx, lab, gid.size, 20, gid)
    b = round_trip(pidx, plab, gid.size, 20, gid[perm])
    assert model_bits(idx, lab, 20, gid)["total"] == pytest.approx(model_bits(pidx, plab, 20, gid[perm])["total"])
    assert abs(len(a) - len(b)) <= 8


# ---------------------------------------------------------------------------------------------- hostile


def check_decoded(data: bytes, count: int, n: int, n_classes: int, groups: object) -> None:
    """Decoding untrusted bytes gives a well-formed selection or a one-line PayloadError, nothing else."""
    try:
        idx, lab = C.decode(data, count, n, n_classes, groups)
    except PayloadError as e:
        assert str(e) and "\n" not in str(e)
        return
    assert idx.size == lab.size == count
    assert not idx.size or (idx[0] >= 0 and idx[-1] < n and bool(np.all(np.diff(idx) > 0)))
    assert not lab.size or (lab.min() >= 0 and lab.max() < n_classes)
    if len(data) % 4 == 0:  # an accepted stream is the sealed one: one more word is never also accepted
        with pytest.raises(PayloadError, match="joint section"):
            C.decode(data + b"\x00" * 4, count, n, n_classes, groups)


HOSTILE_SETUPS = [
    (40, 300, 5, "runs"),
    (299, 300, 3, "runs"),
    (40, 300, 5, None),
    (40, 300, 5, "scattered"),
    (3, 10, 65535, "runs"),
    (1000, 5000, 300, "singletons"),
]


def hostile_groups(kind: str | None, n: int) -> np.ndarray | None:
    rng = np.random.default_rng(9)
    if kind == "runs":
        return np.repeat(np.arange(min(12, n)), sizes_summing_to(rng, n, min(12, n)))
    if kind == "scattered":
        return rng.integers(0, 12, n)
    if kind == "singletons":
        return np.arange(n)
    return None


@settings(max_examples=300, deadline=2000)
@given(setup=st.sampled_from(HOSTILE_SETUPS), raw=st.binary(max_size=600))
def test_random_streams(setup: tuple, raw: bytes) -> None:
    count, n, n_classes, kind = setup
    check_decoded(raw, count, n, n_classes, hostile_groups(kind, n))


@pytest.mark.parametrize("setup", HOSTILE_SETUPS)
def test_bit_flips_and_truncations(setup: tuple) -> None:
    count, n, n_classes, kind = setup
    groups = hostile_groups(kind, n)
    rng = np.random.default_rng(4)
    idx = np.sort(rng.choice(n, count, replace=False))
    data = round_trip(idx, rng.integers(0, n_classes, count), n, n_classes, groups)
    for pos in range(0, len(data), max(1, len(data) // 40)):
        for bit in (0, 3, 7):
            bad = bytearray(data)
            bad[pos] ^= 1 << bit
            check_decoded(bytes(bad), count, n, n_classes, groups)
    for cut in range(0, len(data), 4):
        check_decoded(data[:cut], count, n, n_classes, groups)
    check_decoded(data + b"\x00" * 4, count, n, n_classes, groups)
    check_decoded(data + b"\xff" * 8, count, n, n_classes, groups)
    check_decoded(data[:-1], count, n, n_classes, groups)


@pytest.mark.parametrize("setup", HOSTILE_SETUPS)
def test_only_the_sealed_words_decode(setup: tuple) -> None:
    """A section must be exactly the coder's sealed words: one trailing word, zero or random, is refused.

    The range decoder reads ahead, so a check on whether it is exhausted lets one extra word through;
    decode replays what it decoded into an encoder and compares the words.
    """
    count, n, n_classes, kind = setup
    groups = hostile_groups(kind, n)
    rng = np.random.default_rng(11)
    idx = np.sort(rng.choice(n, count, replace=False))
    lab = rng.integers(0, n_classes, count)
    data = round_trip(idx, lab, n, n_classes, groups)  # the sealed stream still decodes
    assert data and len(data) % 4 == 0
    extras = [b"\x00" * 4, b"\xff" * 4, b"\x00" * 8, data[-4:], *(rng.bytes(4) for _ in range(6))]
    for extra in extras:
        with pytest.raises(PayloadError, match="joint section") as info:
            C.decode(data + extra, count, n, n_classes, groups)
        assert "\n" not in str(info.value)
    for _ in range(20):  # an altered word: refused, or a different selection whose sealed words these are
        bad = bytearray(data)
        pos = int(rng.integers(0, len(bad) // 4)) * 4
        bad[pos : pos + 4] = rng.bytes(4)
        check_decoded(bytes(bad), count, n, n_classes, groups)


def test_extra_word_error_message() -> None:
    idx, lab = np.array([2, 3, 11, 17]), np.array([0, 0, 1, 1])
    data = C.encode(idx, lab, 20, 2)
    assert data.hex() == "1ea08d57"  # docs/FORMAT.md's worked example: one word
    with pytest.raises(PayloadError, match=r"not the coder's sealed output .*\(trailing or altered words\)"):
        C.decode(data + b"\x00" * 4, 4, 20, 2)
    with pytest.raises(PayloadError, match="trailing"):
        C.decode(data + bytes.fromhex("9d3c51e7"), 4, 20, 2)
    got_idx, got_lab = C.decode(data, 4, 20, 2)
    assert got_idx.tolist() == [2, 3, 11, 17] and got_lab.tolist() == [0, 0, 1, 1]


def test_hostile_stream_work_is_bounded() -> None:
    """A big claimed count over garbage costs time and memory in proportion to that count only."""
    rng = np.random.default_rng(6)
    n, count = 2_000_000, 100_000
    tracemalloc.start()
    try:
        start = time.perf_counter()
        for groups in (None, np.repeat(np.arange(2000), 1000)):
            for size in (0, 4, 4000, 400_000):
                raw = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
                check_decoded(raw, count, n, 65535, groups)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 30
    assert peak < 200_000_000


def test_bad_arguments() -> None:
    idx, lab = np.array([1, 5]), np.array([0, 1])
    cases = [
        (lambda: C.encode(idx, lab, 0, 2), "pool_size"),
        (lambda: C.encode(idx, lab, C.MAX_POOL + 1, 2), "pool_size"),
        (lambda: C.encode(idx, lab, 10, 0), "n_classes"),
        (lambda: C.encode(idx, lab, 10, 1), "label out of range"),
        (lambda: C.encode(idx[::-1], lab, 10, 2), "strictly increasing"),
        (lambda: C.encode(np.array([1, 10]), lab, 10, 2), "index out of range"),
        (lambda: C.encode(idx, lab[:1], 10, 2), "equal length"),
        (lambda: C.encode(idx, lab, 10, 2, np.zeros(9, np.int64)), "groups"),
        (lambda: C.decode(b"", 11, 10, 2), "count"),
        (lambda: C.decode(b"", C.MAX_COUNT + 1, 2**30, 2), "count"),
        (lambda: C.decode(b"", 1, 10, 70000), "n_classes"),
        (lambda: C.decode(b"abc", 1, 10, 2), "32-bit words"),
    ]
    for call, match in cases:
        with pytest.raises(PayloadError, match=match):
            call()
