"""The measures the benchmarks keep beside the library: `benchmarks.bits` and `payload_rate.groups_plus_exceptions`."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.bits import ideal_bits, index_costs, model_bits
from benchmarks.payload_rate import groups_plus_exceptions
from plada import payload as P
from plada.errors import PayloadError, PladaError
from plada.rate import confidence, whole_groups

FP = hashlib.sha256(b"test pool manifest").hexdigest()
ZSTD = ("gap-zstd", "bitmap-zstd")  # the paper's codecs, which index_costs measures


def random_payload(pool_size: int, k: int, seed: int) -> P.Payload:
    """k random pool images with labels in 10 classes."""
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(pool_size, size=k, replace=False))
    return P.Payload(FP, pool_size, tuple(f"c{i}" for i in range(10)), idx, rng.integers(0, 10, size=k))


# ---------------------------------------------------------------------------------------------- index_costs


def test_codec_choice_matches_index_costs() -> None:
    for p in (random_payload(10_000, 6_000, 2), random_payload(10_000, 10, 2), random_payload(50_000, 2_000, 2)):
        info = P.describe(P.encode(p, codecs=ZSTD))
        costs = index_costs(p.indices, p.pool_size)
        stored = info["sections"][0]["stored_bytes"]
        assert stored == min(costs["gap_zstd"], costs["bitmap_zstd"])
        best = "gap-zstd" if costs["gap_zstd"] <= costs["bitmap_zstd"] else "bitmap-zstd"
        assert info["sections"][0]["codec"] == best


@pytest.mark.parametrize("n, idx", [(1, [0]), (20, [1, 5, 7]), (16, [0, 8])])
def test_codec_tie_goes_to_gap(n: int, idx: list[int]) -> None:
    costs = index_costs(idx, n)
    assert costs["gap_zstd"] == costs["bitmap_zstd"]  # the case really is a tie
    p = P.Payload(FP, n, ("a",), idx, [0] * len(idx))
    assert P.describe(P.encode(p, codecs=ZSTD))["sections"][0]["codec"] == "gap-zstd"


def test_index_costs() -> None:
    n = 100_003
    p = random_payload(n, 1_000, 4)
    costs = index_costs(p.indices, n)
    assert set(costs) == {"raw", "gap_zstd", "bitmap_zstd"}
    assert costs["raw"] == math.ceil(n / 8)
    assert 0 < costs["gap_zstd"] < costs["raw"] and 0 < costs["bitmap_zstd"] < costs["raw"]
    with_labels = index_costs(p.indices, n, labels=p.labels, n_classes=300)
    assert with_labels["raw"] == math.ceil((n + 1_000 * 9) / 8)
    assert with_labels["gap_zstd"] == costs["gap_zstd"]
    inferred = index_costs(p.indices, n, labels=np.array([0] * 999 + [4]))  # 5 classes -> 3 bits
    assert inferred["raw"] == math.ceil((n + 1_000 * 3) / 8)
    assert index_costs(p.indices, n, n_classes=1)["raw"] == math.ceil(n / 8)
    with pytest.raises(PladaError):
        index_costs([5, 3], n)


# ---------------------------------------------------------------------------------------------- ideal_bits, model_bits
# (tests/test_codec.py holds the codec to both)


def test_reference_formula() -> None:
    """ideal_bits is exactly the issue's formula, checked by hand on a two-group pool."""
    groups = np.array([0] * 4 + [1] * 6)
    idx = np.array([1, 2, 5])
    lab = np.array([0, 0, 1])

    def kt(counts: list[int], c: int) -> float:
        m = sum(counts)
        nats = math.lgamma(c / 2) - math.lgamma(m + c / 2)
        nats += sum(math.lgamma(h + 0.5) - math.lgamma(0.5) for h in counts)
        return -nats / math.log(2)

    want = math.log2(5) + math.log2(math.comb(4, 2)) + math.log2(7) + math.log2(math.comb(6, 1))
    want += kt([2, 0], 2) + kt([0, 1], 2)
    assert ideal_bits(idx, lab, 2, groups) == pytest.approx(want)


@pytest.mark.parametrize("measure", [ideal_bits, model_bits])
def test_pool_size_is_needed_without_groups(measure) -> None:
    with pytest.raises(PayloadError, match="pool_size"):
        measure(np.array([1, 5]), np.array([0, 1]), 2)


# ---------------------------------------------------------------------------------------------- groups_plus_exceptions


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 120), st.integers(1, 6), st.integers(1, 8), st.sampled_from([0.1, 1.0, 5.0]),
       st.integers(0, 2**32 - 1), st.integers(0, 4), st.integers(0, 50))
def test_exceptions_are_the_best_images_outside_the_groups(n, n_classes, n_groups, scale, seed, m, extra):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, n_classes)) * scale
    labels, conf = logits.argmax(1).astype(np.int64), confidence(logits)
    groups = rng.integers(0, n_groups, n).astype(np.int64)
    energy = np.round(rng.normal(size=n), 1)  # coarse values so ties and the tie-break are exercised
    base = whole_groups(labels, energy, groups, conf, m, n_classes, tau=0.5)
    out = groups_plus_exceptions(labels, energy, groups, conf, m, extra, n_classes, tau=0.5)
    assert np.all(np.diff(out.indices) > 0)
    outside = np.setdiff1d(np.arange(len(labels)), base.indices)
    exc = np.setdiff1d(out.indices, base.indices)
    assert len(exc) == min(extra, len(outside))
    if len(exc) and len(exc) < len(outside):
        assert energy[exc].max() <= energy[np.setdiff1d(outside, exc)].min()
    pos = np.searchsorted(out.indices, exc)
    assert np.array_equal(out.labels[pos], labels[exc])  # exceptions keep the teacher's label


def test_exceptions_bad_input_raises_plada_error() -> None:
    with pytest.raises(PladaError):
        groups_plus_exceptions(np.zeros(3, int), np.zeros(3), np.zeros(3, int), np.ones(3), 1, -2, 2)


# ---------------------------------------------------------------------------------------------- spread_order
def test_spread_order_keeps_uncovered_seeds_first_and_nests() -> None:
    from benchmarks.receiver import spread_order

    # a chain 0-1-2-3-4-5 of one label (each image's two nearest are its chain neighbours) and 6, 7 of another
    nbr = np.array([[1, 2], [0, 2], [1, 3], [2, 4], [3, 5], [4, 3], [7, 0], [6, 0]])
    labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    key = np.arange(8, dtype=np.float64)  # lower is better: 0 first
    order = spread_order(labels, key, nbr, cover=1)
    assert sorted(order.tolist()) == list(range(8))  # a permutation of the pool
    # cover 1: a kept image covers its nearest neighbour only: 0 covers 1, 2 covers 1, 3 covers 2, ...
    assert order.tolist() == [0, 2, 3, 4, 5, 6, 1, 7]  # the covered ones wait, in key order
    # a wider neighbourhood spreads seeds further; a neighbour of another label is never covered (6's 0)
    assert spread_order(labels, key, nbr, cover=2).tolist() == [0, 3, 5, 6, 1, 2, 4, 7]


def test_spread_order_puts_rows_the_pool_lacks_last() -> None:
    from benchmarks.receiver import spread_order

    nbr = np.array([[1, 2], [0, 2], [1, 0]])
    key = np.array([np.inf, 0.0, 1.0])  # row 0 is missing from this pool copy
    assert spread_order(np.zeros(3, dtype=np.int64), key, nbr, cover=1).tolist() == [1, 2, 0]


def test_pool_standardised_int8_head_survives_a_near_constant_feature() -> None:
    import importlib.util
    from pathlib import Path

    from benchmarks.paper import int8_head

    spec = importlib.util.spec_from_file_location(
        "int8_head_check", Path(__file__).resolve().parents[1] / "scripts" / "int8_head_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    sd = np.ones(8, dtype=np.float32)
    sd[0] = 1e-4  # a feature that barely varies: a head on raw features gives it a huge weight
    mu = np.zeros(8, dtype=np.float32)
    x = rng.normal(size=(500, 8)).astype(np.float32) * sd
    ws = rng.normal(size=(3, 8)).astype(np.float32)  # a head in the standardised space
    w, b = ws / sd, rng.normal(size=3).astype(np.float32)
    ref = (x @ w.T + b).argmax(1)
    _, wq, bq = int8_head(w, b)
    _, wp, bp = mod.pool_standardised_int8(w, b, mu, sd)
    agree_paper = ((x @ wq.T + bq).argmax(1) == ref).mean()
    agree_pool = ((x @ wp.T + bp).argmax(1) == ref).mean()
    assert agree_pool > 0.97 and agree_pool > agree_paper + 0.2


def test_head_moonshot_uses_the_records_own_paper_best() -> None:
    """A re-run target moves the paper best; the head's ratio must follow it, not the best pool_head saw."""
    from benchmarks.receiver import head_moonshot

    pts = [{"bytes": b, "head_accuracy": a, "linear_student": {"mean": a}} for b, a in ((400, 0.55), (800, 0.60),
                                                                                       (1600, 0.64))]
    new = head_moonshot(pts, {"accuracy": {"mean": 0.608}, "bytes": 20000}, 0.01)
    assert new["cheapest"]["bytes"] == 800 and new["ratio"] == 800 / 20000  # 0.60 >= 0.608 - 0.01
    old = head_moonshot(pts, {"accuracy": {"mean": 0.629}, "bytes": 20187}, 0.01)
    assert old["cheapest"]["bytes"] == 1600 and old["ratio"] == 1600 / 20187
    assert head_moonshot(pts, {"accuracy": 0.70, "bytes": 1000}, 0.01)["ratio"] is None  # none reaches 69%
