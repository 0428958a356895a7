import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plada import codec, select
from plada.errors import PladaError
from plada.rate import confidence, group_order, majority_relabel, whole_groups

FAST = settings(max_examples=100, deadline=None)


@st.composite
def scored_pools(draw):
    n = draw(st.integers(1, 120))
    n_classes = draw(st.integers(1, 6))
    n_groups = draw(st.integers(1, 8))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    logits = rng.normal(size=(n, n_classes)) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    groups = rng.integers(0, n_groups, n)
    energy = np.round(rng.normal(size=n), 1)  # coarse values so ties and the tie-break are exercised
    return logits.argmax(1).astype(np.int64), energy, groups.astype(np.int64), confidence(logits), n_classes


def test_confidence_is_max_softmax():
    logits = np.array([[0.0, 0.0], [10.0, 0.0], [1.0, 2.0, 3.0][:2]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(confidence(logits), p.max(1))
    assert np.allclose(confidence(np.array([[1e4, -1e4]])), 1.0)  # no overflow


@FAST
@given(scored_pools(), st.floats(0, 1))
def test_relabel_moves_only_low_confidence_minorities(pool, tau):
    labels, energy, groups, conf, n_classes = pool
    idx = select.select(labels, energy, max(1, len(labels) // 2), n_classes)
    out = majority_relabel(idx, labels, groups, conf, tau, n_classes)
    assert np.array_equal(out.indices, idx)
    changed = out.labels != labels[idx]
    assert (conf[idx][changed] < tau).all()
    for g in np.unique(groups[idx]):
        m = groups[idx] == g
        maj = np.bincount(labels[idx][m], minlength=n_classes).argmax()
        assert (out.labels[m & changed] == maj).all()
        # every unchanged minority is confident enough to keep its own label
        assert (conf[idx][m & ~changed & (labels[idx] != maj)] >= tau).all()


def test_relabel_extremes():
    labels = np.array([0, 0, 1, 2, 1, 1])
    groups = np.array([0, 0, 0, 0, 1, 1])
    conf = np.array([0.9, 0.9, 0.5, 0.95, 0.4, 0.4])
    idx = np.arange(6)
    assert np.array_equal(majority_relabel(idx, labels, groups, conf, 0.0, 3).labels, labels)
    assert majority_relabel(idx, labels, groups, conf, 0.6, 3).labels.tolist() == [0, 0, 0, 2, 1, 1]
    assert majority_relabel(idx, labels, groups, conf, 1.0, 3).labels.tolist() == [0, 0, 0, 0, 1, 1]


@FAST
@given(scored_pools(), st.integers(0, 8), st.booleans())
def test_whole_groups_keeps_complete_groups_in_energy_order(pool, m, highest):
    labels, energy, groups, conf, n_classes = pool
    out = whole_groups(labels, energy, groups, conf, m, n_classes, highest=highest)
    kept = np.unique(groups[out.indices])
    ranked = group_order(energy, groups, highest)
    assert kept.tolist() == sorted(ranked[:m].tolist())
    assert np.array_equal(out.indices, np.flatnonzero(np.isin(groups, kept)))
    assert np.array_equal(out.labels, labels[out.indices])  # tau = 0: the teacher's labels
    means = {g: energy[groups == g].mean() for g in np.unique(groups)}
    if 0 < len(kept) < len(means):
        worst_kept = max(means[g] for g in kept) if not highest else -min(means[g] for g in kept)
        best_left = min((means[g] if not highest else -means[g]) for g in means if g not in kept)
        assert worst_kept <= best_left


def test_cheap_selections_are_cheap():
    """The point of the policies: whole groups with one label each code far smaller than scattered images."""
    rng = np.random.default_rng(0)
    n, n_classes = 20_000, 10
    groups = np.repeat(np.arange(100), 200)
    logits = rng.normal(size=(n, n_classes)) + 3.0 * np.eye(n_classes)[groups % n_classes]
    labels, conf, energy = logits.argmax(1), confidence(logits), rng.normal(size=n)
    cheap = whole_groups(labels, energy, groups, conf, 10, n_classes, tau=1.0)
    scattered = select.select(labels, energy, len(cheap.indices), n_classes)

    def size(idx, lab):  # the coded selection alone: the payload's fixed header would blur the ratio
        return len(codec.encode(idx, lab, n, n_classes, groups))

    assert len(np.unique(cheap.labels)) <= 10
    assert size(*cheap) * 10 < size(scattered, labels[scattered])


@pytest.mark.parametrize("call", [
    lambda: majority_relabel(np.arange(3), np.zeros(3, int), np.zeros(3, int), np.ones(3), 1.5, 2),
    lambda: majority_relabel(np.array([5]), np.zeros(3, int), np.zeros(3, int), np.ones(3), 0.5, 2),
    lambda: whole_groups(np.zeros(3, int), np.zeros(3), np.zeros(2, int), np.ones(3), 1, 2),
    lambda: whole_groups(np.zeros(3, int), np.array([0, np.nan, 1]), np.zeros(3, int), np.ones(3), 1, 2),
    lambda: whole_groups(np.zeros(3, int), np.zeros(3), np.zeros(3, int), np.ones(3), -1, 2),
    lambda: confidence(np.zeros(3)),
])
def test_bad_inputs_raise_plada_errors(call):
    with pytest.raises(PladaError):
        call()


@FAST
@given(st.lists(st.sampled_from(["a/x/1.png", "a/x/2.png", "a/y/1.png", "b/x/1.png", "top.png", "b/1.png"]),
                min_size=1, max_size=30))
def test_pool_groups_are_sorted_folders(paths):
    """Group ids index the sorted folder names, exactly what np.unique(return_inverse) gives."""
    from pathlib import Path

    from plada.pool import Pool

    pool = Pool("p", Path("."), np.zeros((len(paths), 1, 1, 3), np.uint8), paths, ["0" * 16] * len(paths), "f" * 64)
    ids, names = pool.groups()
    ref_names, ref_ids = np.unique([p.rsplit("/", 1)[0] for p in paths], return_inverse=True)
    assert names == ref_names.tolist() and np.array_equal(ids, ref_ids) and ids.dtype == np.int64
