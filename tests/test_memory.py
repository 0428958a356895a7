"""Pool scores and features are written and read block by block (issue 18, item 3).

Why these tests: a million-image pool's logits and features must never be whole in memory, so scores come
back as a memmap of one merged file, per-image quantities are computed a block of rows at a time, and a
feature build is saved part by part. Each must give exactly the bytes the whole-array code gave.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from plada import data as D
from plada import features as F
from plada import rate
from plada import score as S
from plada.backbones import create
from plada.pool import Pool
from plada.train import predict


def _model(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create("small-cnn", classes, 16, pretrained=False).eval()


def _pool(tmp_path: Path, n: int) -> Pool:
    images = np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return Pool("p", tmp_path, images, [f"x/{i}" for i in range(n)], [f"{i:016x}" for i in range(n)], "cd" * 32)


def _logits(n: int = 103, c: int = 7) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = (rng.normal(0, 4, (n, c))).astype(np.float32)
    x[5] = 0.0  # ties
    x[9, 2] = 80.0  # a saturated row
    return x


def test_rowwise_quantities_equal_the_whole_array_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _logits()
    whole = (S._energy(x, 1.0), S._energy(x, 0.3), S._entropy(x), S._labels(x), rate._confidence(x))
    for rows in (1, 7, 50, 102, 103, 1000):
        got = (S.energy(x, rows=rows), S.energy(x, 0.3, rows=rows), S.entropy(x, rows=rows),
               D.map_rows(S._labels, x, rows), rate.confidence(x, rows=rows))
        for w, g in zip(whole, got, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes(), rows
    monkeypatch.setattr(D, "BLOCK_BYTES", 10 * 8 * 7)  # 10 rows: what `Scores` uses when not told
    s = S.Scores(x)
    assert s.labels.tobytes() == whole[3].tobytes() and s.energy().tobytes() == whole[0].tobytes()
    assert s.entropy().tobytes() == whole[2].tobytes() and s.energy(0.3).tobytes() == whole[1].tobytes()
    assert rate.confidence(x).tobytes() == whole[4].tobytes()
    assert rate.confidence(x.tolist()).tobytes() == whole[4].tobytes()  # plain lists still accepted
    assert S.energy(np.zeros((0, 3), np.float32)).shape == (0,)


def test_scores_are_a_memmap_of_the_merged_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, pool = _model(), _pool(tmp_path, 23)
    s = S.score_pool(model, pool, tmp_path / "scores", batch_size=4, progress=False, chunk=8)
    assert isinstance(s.logits, np.memmap) and not s.logits.flags.writeable
    (d,) = (tmp_path / "scores").iterdir()
    assert Path(s.logits.filename) == d / S.MERGED
    chunks = sorted(d.glob("[0-9]*.npy"))
    assert len(chunks) == 3
    ref = np.concatenate([np.load(p) for p in chunks])
    assert s.logits.tobytes() == ref.tobytes()
    want = np.concatenate([predict(model, pool.images[a : a + 8], batch_size=4, progress=False) for a in (0, 8, 16)])
    assert s.logits.tobytes() == want.tobytes()

    # a valid merge is served without reading any chunk; a rewritten chunk is merged again
    def no_read(*a: object, **k: object) -> None:
        raise AssertionError("a chunk was read")

    monkeypatch.setattr(S, "load_chunk", no_read)
    assert S.score_pool(model, pool, tmp_path / "scores", batch_size=4, progress=False, chunk=8).logits.tobytes() \
        == ref.tobytes()
    monkeypatch.undo()
    chunks[1].write_bytes(chunks[1].read_bytes()[:60])  # torn in place: same inode
    again = S.score_pool(model, pool, tmp_path / "scores", batch_size=4, progress=False, chunk=8)
    assert again.logits.tobytes() == ref.tobytes()
    (d / S.MERGED).unlink()  # a merge lost (say, a crash before its rename): made again from the chunks
    assert S.score_pool(model, pool, tmp_path / "scores", batch_size=4, progress=False, chunk=8).logits.tobytes() \
        == ref.tobytes()
    assert S.score_pool(model, _pool(tmp_path, 0), tmp_path / "empty", progress=False).logits.shape == (0, 3)


def test_killed_scoring_resumes_to_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, pool = _model(), _pool(tmp_path, 30)
    whole = S.score_pool(model, pool, tmp_path / "a", batch_size=5, progress=False, chunk=10).logits
    real, calls = S.predict, []

    def dies(*a: object, **k: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(S, "predict", dies)
    with pytest.raises(KeyboardInterrupt):
        S.score_pool(model, pool, tmp_path / "b", batch_size=5, progress=False, chunk=10)
    (d,) = (tmp_path / "b").iterdir()
    assert sorted(p.name for p in d.iterdir()) == ["000000000000.npy"]  # no merge, no temp left behind
    resumed = S.score_pool(model, pool, tmp_path / "b", batch_size=5, progress=False, chunk=10).logits
    assert len(calls) == 4 and resumed.tobytes() == whole.tobytes()


def test_features_built_in_parts_equal_one_predict(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model()
    images = np.random.default_rng(3).integers(0, 256, (37, 16, 16, 3), dtype=np.uint8)
    monkeypatch.setattr(F, "FEATURE_CHUNK", 9)  # rounded up to 12: three batches of 4 per part
    want = predict(model, images, batch_size=4, progress=False, features=True)
    real, calls = F.predict, []

    def dies(m: object, x: np.ndarray, *a: object, **k: object) -> np.ndarray:
        calls.append(len(x))
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real(m, x, *a, **k)

    monkeypatch.setattr(F, "predict", dies)
    with pytest.raises(RuntimeError, match="killed"):
        F.cached_features(model, images, "pool/k", progress=False, batch_size=4)
    assert not list((cache / "features").glob("*.npy"))
    (parts,) = (cache / "features").glob("*.parts")
    assert [p.name for p in parts.iterdir()] == ["000000000000-b4.npy"]
    got = F.cached_features(model, images, "pool/k", progress=False, batch_size=4)
    assert calls == [12, 12, 12, 12, 1]  # the finished part was not recomputed
    assert isinstance(got, np.memmap) and got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert sorted(p.name for p in (cache / "features").iterdir()) == [Path(got.filename).name]  # parts removed
    assert F.cached_features(model, images, "pool/k", progress=False, batch_size=4).tobytes() == want.tobytes()
    assert len(calls) == 5  # a hit


def test_rows_written_by_blocks_read_back_as_one_npy(tmp_path: Path) -> None:
    x = _logits(50, 3)
    D.atomic_save_rows(tmp_path / "x.npy", x.shape, np.float32, (x[a : a + 16] for a in range(0, 50, 16)))
    back = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert back.shape == x.shape and back.tobytes() == x.tobytes()
    assert (tmp_path / "x.npy").read_bytes() == _npy_bytes(tmp_path, x)  # byte for byte what np.save writes
    with pytest.raises(ValueError, match="rows written"):
        D.atomic_save_rows(tmp_path / "y.npy", (60, 3), np.float32, [x])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.npy", "x.npy"]  # the failed write left nothing


def _npy_bytes(tmp_path: Path, x: np.ndarray) -> bytes:
    np.save(tmp_path / "ref.npy", x)
    return (tmp_path / "ref.npy").read_bytes()


def _tied_logits(n: int, c: int, seed: int = 4) -> np.ndarray:
    """Logits from a few distinct rows, so energies, entropies and labels tie across much of the pool."""
    rng = np.random.default_rng(seed)
    rows = np.round(rng.normal(0, 3, (37, c)), 1).astype(np.float32)
    rows[0] = 0.0  # a flat row: every class ties, argmax takes the first
    x = rows[rng.integers(0, len(rows), n)]
    x[rng.integers(0, n, n // 50)] = rng.normal(0, 3, (n // 50, c)).astype(np.float32)  # and some unique rows
    return x


@pytest.mark.parametrize("policy", ["lowest-energy", "highest-energy", "lowest-entropy", "random"])
def test_streamed_selection_equals_the_whole_array_one(policy: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`Scores.select` (labels and keys made a block of rows at a time) picks exactly what the sender picked
    from whole arrays: same indices in the same order, same labels, whatever the blocks."""
    from plada import select as sel

    x = _tied_logits(2001, 9)
    np.save(tmp_path / "logits.npy", x)
    s = S.Scores(np.load(tmp_path / "logits.npy", mmap_mode="r"))
    labels = S.map_rows(S._labels, x)
    for T in (1.0, 0.5):
        key = sel.rank_key(policy, S.energy(x, T), S.entropy(x), seed=3)
        for safety, alpha in [(0.0, 0.5), (0.2, 0.5), (0.2, -0.2), (1.0, 0.5)]:
            for k in (1, 400, 2001):
                want = sel.select(labels, key, k, 10, safety_share=safety, alpha=alpha)
                assert want.tobytes() == _whole_array_select(labels, key, k, 10, safety, alpha).tobytes()
                for rows in (None, 7, 333, 5000):
                    idx, lab = s.select(policy, k, 10, safety_share=safety, alpha=alpha, T=T, seed=3, rows=rows)
                    assert idx.dtype == np.int64 and idx.tobytes() == want.tobytes(), (T, safety, k, rows)
                    assert lab.dtype == np.int64 and lab.tobytes() == labels[want].tobytes()
    monkeypatch.setattr(D, "BLOCK_BYTES", 10 * 8 * 9)  # 10 rows: what `Scores.select` uses when not told
    key = sel.rank_key(policy, S.energy(x), S.entropy(x), seed=3)
    idx, lab = s.select(policy, 50, 10, safety_share=0.5, seed=3)
    assert idx.tobytes() == _whole_array_select(labels, key, 50, 10, 0.5, 0.5).tobytes()
    with pytest.raises(S.PladaError):
        s.select("median-energy", 5, 10)
    assert [a.size for a in S.Scores(np.zeros((0, 3), np.float32)).select(policy, 0, 3)] == [0, 0]


def _whole_array_select(labels: np.ndarray, key: np.ndarray, k: int, n_classes: int, safety_share: float,
                        alpha: float) -> np.ndarray:
    """The selection as it was before it streamed (a stable argsort of the whole key)."""
    from plada.select import safety_net_quotas

    n = labels.shape[0]
    ranking = np.argsort(key, kind="stable")
    counts = np.bincount(labels, minlength=n_classes).astype(np.int64)
    quotas = safety_net_quotas(counts, int(np.floor(safety_share * k + 0.5)), alpha)
    taken = np.zeros(n, dtype=bool)
    if quotas.any():
        grouped = ranking[np.argsort(labels[ranking], kind="stable")]
        within = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
        taken[grouped[within < np.repeat(quotas, counts)]] = True
    rest = k - int(quotas.sum())
    if rest > 0:
        taken[ranking[~taken[ranking]][:rest]] = True
    return np.flatnonzero(taken).astype(np.int64)


def test_streamed_selection_holds_nothing_pool_long(tmp_path: Path) -> None:
    """Selecting from a logits memmap holds one block and the kept candidates, not N-long arrays."""
    import tracemalloc

    n, c = 1_000_000, 4
    x = np.lib.format.open_memmap(tmp_path / "logits.npy", mode="w+", dtype=np.float32, shape=(n, c))
    for a in range(0, n, 250_000):
        x[a : a + 250_000] = np.random.default_rng(a).normal(0, 2, (250_000, c))
    x.flush()
    s = S.Scores(np.load(tmp_path / "logits.npy", mmap_mode="r"))
    tracemalloc.start()
    try:
        idx, lab = s.select("lowest-energy", 500, c, safety_share=0.2, rows=4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert idx.size == 500 and lab.size == 500
    assert peak < n  # under a byte per pool image; labels + energy + ranking alone were 24 B per image


def test_block_energy_and_entropy_keep_the_old_bits(tmp_path: Path) -> None:
    """The in-place block helpers give bit for bit what the written-out formulas gave (payloads depend on it)."""
    def old_energy(x: np.ndarray, T: float) -> np.ndarray:
        z = x.astype(np.float64) / T
        m = z.max(1, keepdims=True)
        return -T * (m[:, 0] + np.log(np.exp(z - m).sum(1)))

    def old_entropy(x: np.ndarray) -> np.ndarray:
        z = x.astype(np.float64)
        z = z - z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        return -(p * np.log(np.clip(p, 1e-300, None))).sum(1)

    one = np.random.default_rng(0).normal(0, 3, (50, 1)).astype(np.float32)
    for x in (_logits(), _tied_logits(3000, 100), one, np.full((4, 3), -1e30, np.float32)):
        for T in (1.0, 0.3, 2.5):
            assert S._energy(x, T).tobytes() == old_energy(x, T).tobytes()
        assert S._entropy(x).tobytes() == old_entropy(x).tobytes()
    np.save(tmp_path / "x.npy", _tied_logits(500, 7))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")  # a memmap block, as `Scores` passes
    assert S._energy(x, 1.0).tobytes() == old_energy(np.asarray(x), 1.0).tobytes()
    assert S._entropy(x).tobytes() == old_entropy(np.asarray(x)).tobytes()

