import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from plada import select as sel
from plada.errors import PladaError
from plada.select import (
    POLICIES,
    SCORE_OF,
    block_keys,
    budget,
    class_histogram,
    order,
    rank_key,
    safety_net_quotas,
    select,
    select_blocks,
)

FAST = settings(max_examples=150, deadline=None)

counts_st = st.lists(st.integers(0, 60), min_size=1, max_size=25).map(lambda v: np.array(v, dtype=np.int64))
alpha_st = st.sampled_from([-1.0, -0.2, 0.0, 0.5, 1.0, 2.0])


def _reference_select(labels, key, k, n_classes, s, alpha):
    """Slow, obviously-correct Safety-Net: per-class loops over a stable ranking."""
    ranking = np.argsort(key, kind="stable")
    reserve = int(np.floor(s * k + 0.5))
    quotas = safety_net_quotas(np.bincount(labels, minlength=n_classes), reserve, alpha)
    chosen = []
    for c in range(n_classes):
        chosen.extend([i for i in ranking if labels[i] == c][: quotas[c]])
    chosen_set = set(chosen)
    rest = [i for i in ranking if i not in chosen_set][: k - len(chosen)]
    return np.array(sorted(chosen_set | set(rest)), dtype=np.int64)


@st.composite
def pools(draw):
    n = draw(st.integers(1, 150))
    n_classes = draw(st.integers(1, 8))
    labels = np.array(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)), dtype=np.int64)
    # Few distinct key values so ties (and the index tie-break) are exercised.
    key = np.array(draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n)), dtype=np.float64)
    k = draw(st.integers(0, n))
    return labels, key, k, n_classes


# --- budget ---------------------------------------------------------------------------------------------


def test_budget_fraction_and_count():
    assert budget(14_000_000, keep=0.01) == 140_000
    assert budget(1000, keep=1e-9) == 1
    assert budget(3, keep=0.5) == 2  # 1.5 rounds half up, not to even
    assert budget(5, keep=0.5) == 3  # 2.5 rounds half up
    assert budget(10, keep=1.0) == 10
    assert budget(10, count=7) == 7


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep": 0},
        {"keep": 1.5},
        {"keep": -0.1},
        {"keep": float("nan")},
        {"keep": 0.1, "count": 3},
        {},
        {"count": 0},
        {"count": 11},
        {"count": 2.5},
    ],
)
def test_budget_rejects_bad_parameters(kwargs):
    with pytest.raises(PladaError):
        budget(10, **kwargs)


# --- rank_key / order -----------------------------------------------------------------------------------


def _energy(logits, t=1.0):
    z = logits / t
    m = z.max(axis=1, keepdims=True)
    return -t * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


def test_energy_policy_sign():
    logits = np.array([[12.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])  # A confident, B flat
    energy = _energy(logits)
    assert energy[0] < energy[1]
    labels = np.array([0, 1])
    assert select(labels, rank_key("lowest-energy", energy), 1, 4).tolist() == [0]
    assert select(labels, rank_key("highest-energy", energy), 1, 4).tolist() == [1]
    assert order(rank_key("lowest-energy", energy)).tolist() == [0, 1]
    assert order(rank_key("highest-energy", energy)).tolist() == [1, 0]


def test_lowest_entropy_uses_entropy():
    energy = np.array([0.0, -1.0, -2.0])
    entropy = np.array([0.1, 0.9, 0.5])
    assert order(rank_key("lowest-entropy", energy, entropy)).tolist() == [0, 2, 1]
    assert rank_key("lowest-entropy", energy, entropy).dtype == np.float64


def test_random_policy_is_seeded():
    energy = np.zeros(5000)
    labels = np.arange(5000) % 10
    a = select(labels, rank_key("random", energy, seed=3), 50, 10, safety_share=0.2)
    b = select(labels, rank_key("random", energy, seed=3), 50, 10, safety_share=0.2)
    c = select(labels, rank_key("random", energy, seed=4), 50, 10, safety_share=0.2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_order_breaks_ties_by_index():
    assert order(np.array([1.0, 0.0, 1.0, 0.0])).tolist() == [1, 3, 0, 2]


def test_rank_key_rejects_bad_parameters():
    with pytest.raises(PladaError, match="lowest-energy"):
        rank_key("median-energy", np.zeros(3))
    with pytest.raises(PladaError):
        rank_key("lowest-entropy", np.zeros(3))
    with pytest.raises(PladaError):
        rank_key("lowest-entropy", np.zeros(3), np.zeros(4))
    with pytest.raises(PladaError):
        rank_key("lowest-energy", np.array([0.0, np.nan]))
    assert set(POLICIES) == {"lowest-energy", "highest-energy", "lowest-entropy", "random"}


# --- safety_net_quotas ----------------------------------------------------------------------------------


def test_quotas_worked_examples():
    # 1 each to the 3 non-empty classes, then 7 by sqrt weights 10:5:2 -> 4.12, 2.06, 0.82 -> 4, 2, 1.
    assert safety_net_quotas(np.array([100, 25, 0, 4]), 10, 0.5).tolist() == [5, 3, 0, 2]
    # Class 1 (N=2) would get ~17 of the 17 spare seats under alpha=-1: capped at 2, rest to class 0.
    assert safety_net_quotas(np.array([1000, 2, 1]), 20, -1.0).tolist() == [17, 2, 1]
    # Fewer seats than classes: no floor, equal shares, ties to the lower class index.
    assert safety_net_quotas(np.array([5, 5, 5, 5]), 2, 0.5).tolist() == [1, 1, 0, 0]
    # Reserve beyond the pool: everything is taken.
    assert safety_net_quotas(np.array([3, 0, 2]), 99, 0.5).tolist() == [3, 0, 2]
    assert safety_net_quotas(np.array([0, 0]), 5, 0.5).tolist() == [0, 0]


@FAST
@given(counts_st, st.integers(0, 1500), alpha_st)
def test_quota_invariants(counts, reserve, alpha):
    q = safety_net_quotas(counts, reserve, alpha)
    assert q.dtype == np.int64
    assert q.sum() == min(reserve, counts.sum())
    assert (q >= 0).all() and (q <= counts).all()
    assert (q[counts == 0] == 0).all()
    if reserve >= (counts > 0).sum():
        assert (q[counts > 0] >= 1).all()


@FAST
@given(
    st.lists(st.integers(1, 400), min_size=2, max_size=20).map(np.array),
    st.integers(0, 300),
    st.sampled_from([-1.0, -0.2, 0.5, 1.0, 2.0]),
)
def test_quotas_monotone_when_no_cap_binds(counts, reserve, alpha):
    q = safety_net_quotas(counts, reserve, alpha)
    assume((q < counts).all())  # a cap bound iff some class was filled to N_c
    more = counts[:, None] > counts[None, :]  # more[a, b]: class a has more images than b
    if alpha > 0:
        assert (q[:, None] >= q[None, :])[more].all()
    else:
        assert (q[:, None] <= q[None, :])[more].all()


def test_quotas_reject_bad_parameters():
    with pytest.raises(PladaError):
        safety_net_quotas(np.array([1, -1]), 1, 0.5)
    with pytest.raises(PladaError):
        safety_net_quotas(np.array([1, 1]), -1, 0.5)
    with pytest.raises(PladaError):
        safety_net_quotas(np.array([1, 1]), 1, float("inf"))


# --- select ---------------------------------------------------------------------------------------------


@FAST
@given(pools(), st.floats(0.0, 1.0), alpha_st)
def test_select_invariants_and_reference(pool, s, alpha):
    labels, key, k, n_classes = pool
    idx = select(labels, key, k, n_classes, safety_share=s, alpha=alpha)
    assert idx.dtype == np.int64
    assert idx.size == k
    assert (np.diff(idx) > 0).all()
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < labels.size)
    np.testing.assert_array_equal(idx, _reference_select(labels, key, k, n_classes, s, alpha))
    # Every class gets at least its quota.
    reserve = int(np.floor(s * k + 0.5))
    quotas = safety_net_quotas(np.bincount(labels, minlength=n_classes), reserve, alpha)
    assert (class_histogram(labels, idx, n_classes) >= quotas).all()


@FAST
@given(pools())
def test_select_without_safety_net_is_top_k(pool):
    labels, key, k, n_classes = pool
    idx = select(labels, key, k, n_classes, safety_share=0.0)
    np.testing.assert_array_equal(idx, np.sort(np.argsort(key, kind="stable")[:k]))


@FAST
@given(pools(), alpha_st)
def test_full_safety_net_keeps_every_class(pool, alpha):
    labels, key, k, n_classes = pool
    assume(k >= (np.bincount(labels, minlength=n_classes) > 0).sum())
    idx = select(labels, key, k, n_classes, safety_share=1.0, alpha=alpha)
    present = np.bincount(labels, minlength=n_classes) > 0
    assert (class_histogram(labels, idx, n_classes)[present] >= 1).all()


@pytest.mark.parametrize("alpha", [0.5, -0.2])
def test_near_degenerate_pool_keeps_rare_classes(alpha):
    n, n_classes = 20_000, 12
    labels = np.zeros(n, dtype=np.int64)
    labels[-20:] = np.arange(20) % 10 + 1  # 99.9% class 0; classes 1..10 have 2 images each; 11 has none
    key = np.where(labels == 0, -1.0, 1.0) + np.linspace(0, 0.5, n)  # class 0 is always more confident
    k = budget(n, keep=0.01)
    plain = class_histogram(labels, select(labels, key, k, n_classes), n_classes)
    assert plain[1:].sum() == 0  # without the Safety-Net the rare classes vanish
    kept = select(labels, key, k, n_classes, safety_share=0.1, alpha=alpha)
    hist = class_histogram(labels, kept, n_classes)
    assert hist.sum() == k
    assert (hist[:11] >= 1).all() and hist[11] == 0


def test_select_edge_cases():
    labels = np.array([0, 1, 1])
    key = np.array([0.3, 0.1, 0.2])
    assert select(labels, key, 0, 2, safety_share=1.0).tolist() == []
    assert select(labels, key, 3, 2, safety_share=0.5).tolist() == [0, 1, 2]
    # One seat for two classes: alpha < 0 gives it to the rarer class 0, alpha > 0 to class 1's best image.
    assert select(labels, key, 1, 2, safety_share=1.0, alpha=-1.0).tolist() == [0]
    assert select(labels, key, 1, 2, safety_share=1.0, alpha=1.0).tolist() == [1]


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((np.array([0, 1]), np.zeros(2), 1, 2), {"safety_share": 2.0}),
        ((np.array([0, 1]), np.zeros(2), 1, 2), {"safety_share": -0.1}),
        ((np.array([0, 2]), np.zeros(2), 1, 2), {}),
        ((np.array([0, -1]), np.zeros(2), 1, 2), {}),
        ((np.array([0, 1]), np.zeros(3), 1, 2), {}),
        ((np.array([0, 1]), np.zeros(2), 3, 2), {}),
        ((np.array([0, 1]), np.zeros(2), -1, 2), {}),
        ((np.array([0, 1]), np.zeros(2), 1, 0), {}),
        ((np.array([0.0, 1.0]), np.zeros(2), 1, 2), {}),
    ],
)
def test_select_rejects_bad_parameters(args, kwargs):
    with pytest.raises(PladaError):
        select(*args, **kwargs)


def test_class_histogram():
    labels = np.array([2, 0, 2, 1, 2])
    assert class_histogram(labels, np.array([0, 2, 3]), 4).tolist() == [0, 1, 2, 0]
    assert class_histogram(labels, np.array([], dtype=np.int64), 3).tolist() == [0, 0, 0]
    with pytest.raises(PladaError):
        class_histogram(labels, np.array([5]), 3)


# --- streaming selection (issue 18: memory O(k + classes + a block), not O(pool)) ------------------------


def _whole_array_select(labels, key, k, n_classes, safety_share=0.0, alpha=0.5):
    """`select` as it was before it streamed (argsort of the whole key): the results must not change."""
    lab, keys = np.asarray(labels), np.asarray(key, dtype=np.float64)
    n = lab.shape[0]
    ranking = np.argsort(keys, kind="stable")
    reserve = int(np.floor(float(safety_share) * k + 0.5))
    counts = np.bincount(lab, minlength=n_classes).astype(np.int64)
    quotas = safety_net_quotas(counts, reserve, alpha)
    taken = np.zeros(n, dtype=bool)
    if quotas.any():
        grouped = ranking[np.argsort(lab[ranking], kind="stable")]
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        within = np.arange(n) - starts
        taken[grouped[within < np.repeat(quotas, counts)]] = True
    rest = k - int(quotas.sum())
    if rest > 0:
        taken[ranking[~taken[ranking]][:rest]] = True
    return np.flatnonzero(taken).astype(np.int64)


def _in_blocks(labels, key, cuts):
    """A `select_blocks` source cutting the arrays at `cuts` (empty blocks included), counting its passes."""
    bounds = list(zip([0, *cuts], [*cuts, labels.size], strict=True))
    passes = []

    def blocks(with_keys):
        passes.append(with_keys)
        for a, b in bounds:
            yield labels[a:b], (key[a:b] if with_keys else None)

    return blocks, passes


@FAST
@given(pools(), st.sampled_from([0.0, 0.05, 0.2, 0.5, 1.0]), alpha_st, st.data())
def test_streamed_selection_equals_the_whole_array_one(pool, s, alpha, data):
    labels, key, k, n_classes = pool
    key = np.where(key == 0, data.draw(st.sampled_from([0.0, -0.0])), key)  # signed zeros tie like argsort's
    cuts = sorted(data.draw(st.lists(st.integers(0, labels.size), max_size=12)))
    blocks, passes = _in_blocks(labels, key, cuts)
    idx, lab = select_blocks(blocks, labels.size, k, n_classes, safety_share=s, alpha=alpha)
    want = _whole_array_select(labels, key, k, n_classes, s, alpha)
    assert idx.dtype == np.int64 and idx.tobytes() == want.tobytes()
    assert lab.dtype == np.int64 and lab.tobytes() == labels[want].astype(np.int64).tobytes()
    reserve = int(np.floor(s * k + 0.5))
    assert passes == ([False, True] if reserve else [True])  # the counting pass only for a Safety-Net


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("s, alpha", [(0.0, 0.5), (0.1, 0.5), (0.5, -0.2), (1.0, 0.5), (1.0, -1.0)])
def test_streamed_policies_equal_the_whole_array_ones(policy, s, alpha, monkeypatch):
    """Each policy's key made block by block and selected block by block gives the old selection exactly."""
    rng = np.random.default_rng(7)
    n, n_classes = 30_011, 13
    labels = np.minimum(rng.geometric(0.25, n) - 1, n_classes - 2)  # skewed; the last class is empty
    energy = np.round(rng.normal(0, 1, n), 1)  # a few hundred distinct values: ties everywhere
    energy[::97] = -0.0
    energy[::89] = 0.0
    energy[5:40] = np.inf
    entropy = np.round(rng.uniform(0, 2, n), 2)
    whole_key = rank_key(policy, energy, entropy, seed=11)
    monkeypatch.setattr(sel, "BLOCK_ROWS", 1000)
    cuts = list(range(0, n, 777))

    def blocks(with_keys):
        keyf = block_keys(policy, seed=11)  # a fresh random stream each pass
        for a, b in zip(cuts, [*cuts[1:], n], strict=True):
            score = {"energy": energy[a:b], "entropy": entropy[a:b], None: b - a}[SCORE_OF[policy]]
            yield labels[a:b], (keyf(score) if with_keys else None)

    for k in (1, 97, 3000, n - 5, n):
        want = _whole_array_select(labels, whole_key, k, n_classes, s, alpha)
        assert select(labels, whole_key, k, n_classes, safety_share=s, alpha=alpha).tobytes() == want.tobytes()
        idx, lab = select_blocks(blocks, n, k, n_classes, safety_share=s, alpha=alpha)
        assert idx.tobytes() == want.tobytes() and lab.tobytes() == labels[want].tobytes(), k


@pytest.mark.parametrize("policy", POLICIES)
def test_block_keys_concatenate_to_rank_key(policy):
    rng = np.random.default_rng(2)
    energy, entropy = rng.normal(0, 1, 1000), rng.uniform(0, 2, 1000)
    keyf = block_keys(policy, seed=5)
    src = {"energy": energy, "entropy": entropy, None: energy}[SCORE_OF[policy]]
    got = np.concatenate([keyf(src[a:b]) for a, b in [(0, 1), (1, 1), (1, 400), (400, 1000)]])
    want = rank_key(policy, energy, entropy, seed=5)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    with pytest.raises(PladaError):
        block_keys("median-energy")
    with pytest.raises(PladaError):
        block_keys("random", seed=1.5)
    if policy != "random":
        with pytest.raises(PladaError, match="NaN"):
            block_keys(policy)(np.array([0.0, np.nan]))


def test_streamed_selection_worst_case_orders():
    """Keys falling (every row displaces the kept ones), rising, and constant: many cuts of the buffers."""
    n, n_classes = 5000, 4
    labels = (np.arange(n) * 7 % 5).clip(0, n_classes - 1)
    for key in (-np.arange(n, dtype=float), np.arange(n, dtype=float), np.zeros(n), np.arange(n) % 3 * 1.0):
        for k, s in [(10, 0.0), (10, 1.0), (300, 0.3), (4999, 0.9)]:
            blocks, _ = _in_blocks(labels, key, list(range(0, n, 64)))
            idx, _ = select_blocks(blocks, n, k, n_classes, safety_share=s, alpha=-0.2)
            assert idx.tobytes() == _whole_array_select(labels, key, k, n_classes, s, -0.2).tobytes()


def test_streamed_selection_rejects_bad_blocks():
    labels, key = np.array([0, 1, 1, 0]), np.array([0.0, 1.0, 2.0, 3.0])
    blocks, _ = _in_blocks(labels, key, [2])
    with pytest.raises(PladaError, match="rows"):
        select_blocks(blocks, 5, 1, 2)
    with pytest.raises(PladaError, match="rows"):
        select_blocks(blocks, 5, 1, 2, safety_share=1.0)
    blocks, _ = _in_blocks(labels, np.array([0.0, 1.0, np.nan, 3.0]), [2])
    with pytest.raises(PladaError, match="NaN"):
        select_blocks(blocks, 4, 1, 2)
    blocks, _ = _in_blocks(np.array([0, 1, 2, 0]), key, [2])
    with pytest.raises(PladaError, match="labels"):
        select_blocks(blocks, 4, 1, 2)
    with pytest.raises(PladaError, match="labels"):
        select_blocks(blocks, 4, 1, 2, safety_share=0.5)


def test_select_holds_no_pool_long_temporary():
    """Beyond its inputs, `select` holds O(k + classes + a block), not an argsort of the pool."""
    import tracemalloc

    rng = np.random.default_rng(0)
    n = 1_000_000
    labels, key = rng.integers(0, 50, n), np.round(rng.normal(0, 1, n), 2)
    tracemalloc.start()
    try:
        idx = select(labels, key, 1000, 50, safety_share=0.2)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert idx.tobytes() == _whole_array_select(labels, key, 1000, 50, 0.2).tobytes()
    # One block's temporaries (BLOCK_ROWS rows) and the buffers; the whole-array code held about 60 MB here.
    assert peak < 2 * 2**20, peak
