"""Receiver modes (plada.receiver): deterministic, better than plain where the pool's structure helps, wired into
`plada receive` without ever touching the target's train split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, run

from plada import data, payload, receiver
from plada.config import ReceiveConfig, StudentConfig
from plada.errors import PladaError
from plada.pipeline import receive
from plada.shards import open_any
from plada.train import accuracy


def clustered_world(seed: int = 0):
    """Five stretched Gaussian clusters in 16-d, one labelled example each: a head on five points misses
    most of each cluster's shape, the unlabeled pool shows it."""
    rng = np.random.default_rng(seed)
    c, d = 5, 16
    centres = rng.normal(0, 1, (c, d)) * 3
    stretch = rng.normal(0, 1, (c, d, d)) / np.sqrt(d) * 2.0

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % c
        x = centres[y] + np.einsum("nij,nj->ni", stretch[y], rng.normal(0, 1, (n, d)))
        return x.astype(np.float32), y

    pool_f, pool_y = draw(1500)
    test_f, test_y = draw(500)
    idx = np.array([np.flatnonzero(pool_y == k)[0] for k in range(c)])
    return pool_f, pool_y, test_f, test_y, idx, c


@pytest.mark.parametrize("mode", receiver.LABEL_MODES)  # head: tests/test_head.py
def test_each_mode_deterministic_given_seed(mode: str, cache: Path) -> None:
    pool_f, pool_y, _, _, idx, c = clustered_world()
    runs = [receiver.expand(mode, pool_f, idx, pool_y[idx], c, seed=3, pseudo=200, progress=False) for _ in range(2)]
    a, b = runs
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.labels, b.labels)
    assert (a.weights is None) == (b.weights is None)
    if a.weights is not None:
        assert np.array_equal(a.weights, b.weights)
    heads = [receiver.fit_head(pool_f, e, c, steps=50, seed=3) for e in runs]
    assert np.array_equal(heads[0][0], heads[1][0]) and np.array_equal(heads[0][1], heads[1][1])
    # the payload's own rows always come first, with the sender's labels
    assert np.array_equal(a.indices[: len(idx)], idx) and np.array_equal(a.labels[: len(idx)], pool_y[idx])
    assert len(np.unique(a.indices)) == len(a.indices)
    assert len(a.indices) == len(idx) + (0 if mode == "plain" else 200)


def test_pool_modes_beat_plain_on_clustered_world(cache: Path) -> None:
    pool_f, pool_y, test_f, test_y, idx, c = clustered_world()
    acc = {}
    for mode in receiver.LABEL_MODES:
        e = receiver.expand(mode, pool_f, idx, pool_y[idx], c, seed=0, pseudo=300, progress=False)
        w, b = receiver.fit_head(pool_f, e, c, steps=200, seed=0)
        acc[mode] = accuracy(test_f @ w.T + b, test_y)
        if mode != "plain":  # pseudo-labels are balanced and mostly right
            assert e.info["pseudo_per_class"] == [60] * c
            assert (e.labels == pool_y[e.indices]).mean() > 0.9
    assert acc["plain"] < 0.8
    assert acc["selftrain"] > acc["plain"] + 0.15 and acc["propagate"] > acc["plain"] + 0.15, acc


def test_never_pseudo_labels_disallowed_rows(cache: Path) -> None:
    pool_f, pool_y, _, _, idx, c = clustered_world()
    allowed = np.ones(len(pool_f), dtype=bool)
    allowed[::2] = False  # e.g. rows this receiver's pool lacks
    allowed[idx] = True
    for mode in ("selftrain", "propagate"):
        e = receiver.expand(mode, pool_f, idx, pool_y[idx], c, pseudo=400, allowed=allowed, progress=False)
        assert allowed[e.indices].all() and len(e.indices) == len(idx) + 400


def test_knn_graph_exact_cached_and_resumable(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(0, 1, (300, 8)).astype(np.float32)
    nbr, sim = receiver.knn_graph(f, 5, "test-feats", dim=8, chunk=50, part_rows=100, progress=False)
    u = f / np.linalg.norm(f, axis=1, keepdims=True)
    u = u - u.mean(0)  # the graph is built in the centred (here full-width) PCA space
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    want = np.argsort(-s, axis=1, kind="stable")[:, :5]
    assert np.array_equal(np.sort(nbr, 1), np.sort(want, 1))
    assert np.allclose(sim, np.take_along_axis(s, nbr.astype(np.int64), 1), atol=1e-5)
    assert (np.diff(sim, axis=1) <= 1e-7).all()  # nearest first

    def boom(*a, **k):
        raise AssertionError("a cached graph must not be recomputed")

    with monkeypatch.context() as m:  # (a plain undo() would also drop the cache fixture's PLADA_CACHE)
        m.setattr(receiver, "_project", boom)
        again = receiver.knn_graph(f, 5, "test-feats", dim=8, chunk=50, part_rows=100, progress=False)
    assert np.array_equal(again[0], nbr)

    calls = {"n": 0}
    real = receiver._row_order

    def dies_on_third_chunk(v, i):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(v, i)

    with monkeypatch.context() as m:
        m.setattr(receiver, "_row_order", dies_on_third_chunk)
        with pytest.raises(KeyboardInterrupt):
            receiver.knn_graph(f, 4, "test-feats", dim=8, chunk=50, part_rows=100, progress=False)
        calls["n"] = 10  # no more interruptions: count what the resumed build computes
        resumed = receiver.knn_graph(f, 4, "test-feats", dim=8, chunk=50, part_rows=100, progress=False)
    assert calls["n"] - 10 == 4  # 6 chunks in all, the first part's 2 were kept
    fresh = receiver.knn_graph(f, 4, "other-key", dim=8, chunk=50, part_rows=100, progress=False)
    assert np.array_equal(resumed[0], fresh[0]) and np.array_equal(resumed[1], fresh[1])
    assert sorted(p.name for p in (cache / "knn").iterdir()) == sorted(p.name for p in (cache / "knn").glob("*.npz"))


def test_knn_graph_survives_a_concurrent_build_of_the_same_graph(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process finishing the same graph removes the part files mid-build: no error, the same graph."""
    import shutil

    f = np.random.default_rng(2).normal(0, 1, (300, 8)).astype(np.float32)
    want = receiver.knn_graph(f, 5, "alone", dim=8, chunk=50, part_rows=100, progress=False)
    real = data.atomic_save_npy

    def other_process_finished(path, arr):
        shutil.rmtree(Path(path).parent)  # its merge removed the parts folder: this save finds no folder
        real(path, arr)

    with monkeypatch.context() as m:
        m.setattr(receiver, "atomic_save_npy", other_process_finished)
        got = receiver.knn_graph(f, 5, "racing", dim=8, chunk=50, part_rows=100, progress=False)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_resolve_mode() -> None:
    assert receiver.resolve_mode(None, "plain") == ("plain", "payload")
    assert receiver.resolve_mode(None, "propagate") == ("propagate", "payload")
    assert receiver.resolve_mode("plain", "propagate") == ("plain", "option")
    assert receiver.MODES == payload.RECEIVERS  # every mode a header may name is one this receiver has
    for bad in ("no-such", 3, ["plain"], "x" * 500):
        with pytest.raises(PladaError, match="receiver mode") as e:
            receiver.resolve_mode(bad, "plain")
        assert "\n" not in str(e.value) and len(str(e.value)) < 600


def test_config_refuses_idle_knobs() -> None:
    ReceiveConfig(mode="propagate", knn=10, pseudo=100).check()
    ReceiveConfig(knn=10).check()  # the header decides the mode: checked again once it is known
    for bad, msg in ((ReceiveConfig(mode="plain", pseudo=5), "pseudo"), (ReceiveConfig(mode="selftrain", knn=5), "knn"),
                     (ReceiveConfig(mode="propagate", rounds=2), "rounds"), (ReceiveConfig(mode="x"), "receiver mode"),
                     (ReceiveConfig(knn=0), "knn"), (ReceiveConfig(knn=51), "knn")):
        with pytest.raises(PladaError, match=msg):
            bad.check()


def test_cap_keeps_payload_and_every_class() -> None:
    idx = np.arange(10)
    e = receiver.Expansion(np.arange(100), np.r_[np.zeros(10, int), np.arange(90) % 3], np.linspace(1, 0.1, 100),
                           {"payload": 10})
    c = e.capped(40)
    assert len(c.indices) == 40 and np.isin(idx, c.indices).all()
    assert np.bincount(c.labels[~np.isin(c.indices, idx)], minlength=3).tolist() == [10, 10, 10]
    # unweighted pseudo-labels (selftrain, head) still keep their surest rows, not their lowest row numbers
    conf = np.r_[np.ones(10), np.random.default_rng(0).random(90)]
    u = receiver.Expansion(np.arange(100), e.labels, None, {"payload": 10}, conf).capped(40)
    for k in range(3):
        rows = np.flatnonzero(e.labels[10:] == k) + 10
        assert set(u.indices[np.isin(u.indices, rows)]) == set(rows[np.argsort(-conf[rows])[:10]])
    assert receiver.finetune_budget(6000, 1200, 15.0, 128) == pytest.approx(2 * 10 * 15 / 47)
    assert receiver.finetune_budget(1300, 1200, 15.0, 128) == 15.0


def _tiny_payload(tiny_data: Path, tmp_path: Path, receiver: str = "plain") -> Path:
    pool = open_any("tinypool", tiny_data, progress=False)
    # tinypool's folders 0-2 are red, green, blue: four images of each, labelled with tinytarget's classes
    folders = pool.groups()[0]
    idx = np.sort(np.concatenate([np.flatnonzero(folders == g)[:4] for g in range(3)]))
    lut = {0: 2, 1: 1, 2: 0}  # tinytarget's classes sort as blue, green, red
    labels = np.array([lut[int(folders[i])] for i in idx])
    p = payload.Payload(pool.fingerprint, len(pool), ("blue", "green", "red"), idx, labels, receiver=receiver)
    out = tmp_path / "t.plada"
    payload.write(out, p, groups=folders)
    return out


def _renamed_receiver(data: bytes, mode: str) -> bytes:
    """The same payload with another receiver mode in its header (a newer sender's, say), re-sealed."""
    import hashlib
    import json

    import zstandard as zstd

    hlen = int.from_bytes(data[10:14], "little")
    zd = zstd.ZstdCompressionDict(payload.HEADER_DICT, dict_type=zstd.DICT_TYPE_RAWCONTENT)
    header = json.loads(zstd.ZstdDecompressor(dict_data=zd).decompress(data[14 : 14 + hlen]))
    header["receiver"] = mode
    packed = zstd.ZstdCompressor(dict_data=zd, write_content_size=True, write_dict_id=False).compress(
        json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    body = data[:10] + len(packed).to_bytes(4, "little") + packed + data[14 + hlen : -32]
    return body + hashlib.sha256(body).digest()


def test_receive_uses_header_mode_and_never_opens_target_train(tiny_data: Path, cache: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = _tiny_payload(tiny_data, tmp_path, "propagate")
    opened = []
    real = data.Source.split

    def guarded(self, split):
        opened.append((self.name, split))
        if self.name == "tinytarget" and split != "test":
            raise AssertionError(f"the receiver opened the target's {split} split")
        return real(self, split)

    monkeypatch.setattr(data.Source, "split", guarded)
    cfg = ReceiveConfig(student=StudentConfig(mode="linear", res=32), pseudo=60)
    rep = receive(out, "tinypool", cfg, data=tiny_data, test="tinytarget", progress=False)
    assert ("tinytarget", "test") in opened and not any(s == "train" for n, s in opened if n == "tinytarget")
    assert rep["receiver"]["mode"] == "propagate" and rep["receiver"]["from"] == "payload"
    assert rep["receiver"]["pseudo"] == 60 and rep["receiver"]["trained_on"] == 72
    assert 0.5 < rep["student_accuracy"] <= 1.0  # three clean colours: far above a third
    plain = receive(out, "tinypool", ReceiveConfig(student=cfg.student, mode="plain"), data=tiny_data,
                    test="tinytarget", progress=False)
    assert plain["receiver"]["from"] == "option" and plain["receiver"]["trained_on"] == 12


def test_unknown_header_mode_refused_in_one_line(tiny_data: Path, cache: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    out = _tiny_payload(tiny_data, tmp_path)
    odd = tmp_path / "odd.plada"
    odd.write_bytes(_renamed_receiver(out.read_bytes(), "telepathy"))
    for extra in ([], ["--receiver", "selftrain"]):  # the sender's forecast assumed it: no override receives it
        code, _, err = run(capsys, "receive", str(odd), "--pool", "tinypool", "--data", str(tiny_data),
                           "--student-mode", "linear", "--set", "student.res=32", *extra)
        assert code == 2 and one_line(err) and "telepathy" in err and "unknown receiver mode" in err
    code, rep, err = run(capsys, "receive", str(out), "--pool", "tinypool", "--data", str(tiny_data),
                         "--student-mode", "linear", "--set", "student.res=32", "--receiver", "selftrain",
                         "--set", "pseudo=30")
    assert code == 0, err
    assert rep["receiver"]["mode"] == "selftrain" and rep["receiver"]["trained_on"] == 42
    code, _, err = run(capsys, "receive", str(out), "--pool", "tinypool", "--data", str(tiny_data),
                       "--receiver", "plain", "--set", "knn=5")
    assert code == 2 and one_line(err) and "knn" in err


@pytest.mark.slow
def test_receiver_benchmark_quick(tiny_data: Path, cache: Path, tmp_path: Path) -> None:
    from benchmarks import receiver as bench

    code = bench.main(["--quick", "--data", str(tiny_data), "--pool", "tinypool", "--targets", "tinytarget",
                       "--out-dir", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "results" / "receiver_quick.json").read_text())
    r = res["targets"]["tinytarget"]
    assert r["points"] and all(p["bytes"] <= p["bytes_target"] for p in r["points"])
    for p in r["points"]:
        assert set(p["modes"]) == set(receiver.LABEL_MODES)
        assert all(0 <= m["accuracy"]["mean"] <= 1 for m in p["modes"].values())
        fc = p["forecast"]  # the sender's forecast of each mode, and the mode it would name
        assert set(fc["modes"]) == set(receiver.LABEL_MODES) and fc["choice"] in receiver.LABEL_MODES
        assert fc["modes"][fc["choice"]] == max(fc["modes"].values()) and fc["held_out"] > 0
    assert r["validation"]["grid"] and r["int8_head"]["bytes"] > 0 and "moonshot_ratio" in r
    assert r["finetune"] and all(0 <= f["accuracy"] <= 1 for f in r["finetune"])
    for key in ("command", "machine", "wall_seconds"):
        assert key in res
    assert "| tinytarget |" in (tmp_path / "benchmarks" / "reports" / "RECEIVER_quick.md").read_text()
    png = tmp_path / "benchmarks" / "reports" / "plots" / "receiver_quick_tinytarget.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    merged = tmp_path / "merged"
    assert bench.main(["--quick", "--merge", str(tmp_path / "results" / "receiver_quick.json"),
                       "--out-dir", str(merged)]) == 0
    again = json.loads((merged / "results" / "receiver_quick.json").read_text())
    assert again["targets"] == res["targets"]


@pytest.mark.slow
def test_pool_head_benchmark_quick(tiny_data: Path, cache: Path, tmp_path: Path) -> None:
    from benchmarks import pool_head

    code = pool_head.main(["--quick", "--data", str(tiny_data), "--pool", "tinypool", "--targets", "tinytarget",
                           "--out-dir", str(tmp_path), "--finetune-targets", "tinytarget"])
    assert code == 0
    r = json.loads((tmp_path / "results" / "pool_head_quick.json").read_text())["targets"]["tinytarget"]
    assert {(c["dim"], c["bits"]) for c in r["cells"]} == {(4, 8), (4, 4), (16, 8), (16, 4)}
    assert all(0 <= c["accuracy"]["mean"] <= 1 and c["bytes"] > 0 for c in r["cells"])
    by = {(c["dim"], c["bits"]): c["bytes"] for c in r["cells"]}
    assert by[(4, 8)] < by[(16, 8)]  # more dimensions, more bytes
    pts = r["points"]  # the library's path under each budget
    assert [p["budget"] for p in pts] == [400, 1000] and all(p["bytes"] <= p["budget"] for p in pts)
    assert all(p["pool_rows"] > 0 and p["linear_student"]["mean"] > 0.5 for p in pts)  # chance: 1/3
    ft = [p["finetune"] for p in pts if "finetune" in p]
    assert len(ft) == 1 and 0 < ft[0]["trained_on"] <= pts[1]["pool_rows"] and 0 <= ft[0]["accuracy"] <= 1
    assert "moonshot" in r
    assert "| tinytarget |" in (tmp_path / "benchmarks" / "reports" / "POOL_HEAD_quick.md").read_text()


def test_student_epochs_follow_the_training_set_and_pool_modes_keep_their_bound() -> None:
    """No epochs set: STUDENT_SAMPLES images seen within STUDENT_EPOCHS (a 533-image payload: 94 epochs, not 15);
    a pool mode's fine-tune is bounded from the paper's 15 epochs exactly as when 15 is asked for."""
    from plada import config

    s = StudentConfig(mode="finetune")
    assert s.epochs is None and s.for_rows(533).epochs == round(config.STUDENT_SAMPLES / 533, 2)
    assert s.for_rows(10_000).epochs == 15.0 and s.for_rows(10).epochs == 100.0
    assert StudentConfig(epochs=3.0).for_rows(10).epochs == 3.0
    exp = receiver.Expansion(np.arange(9000), np.arange(9000) % 3, None, {})
    got = receiver.student_recipe(exp, s, "selftrain", 533, 120_000)[1]
    want = receiver.student_recipe(exp, StudentConfig(mode="finetune", epochs=15.0), "selftrain", 533, 120_000)[1]
    assert got.epochs == want.epochs < 15.0
