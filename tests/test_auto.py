"""The auto policy search on tiny synthetic arrays: budget, determinism, degenerate teachers, honest forecasts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from plada import auto, payload, rate, select
from plada.errors import PladaError
from plada.train import torch_threads, train_head

FP = "ab" * 32
STEPS = 60


def world(n: int = 600, d: int = 16, c: int = 3, seed: int = 0, wrong_low_energy: bool = False,
          degenerate: bool = False) -> dict:
    """A pool of Gaussian class clusters with teacher scores, plus held-out and target-train features."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(c, d)) * 2.5
    true = rng.integers(0, c, n)
    if degenerate:  # the teacher's world is nearly all class 0: a few pool images of each other class
        true = np.zeros(n, dtype=np.int64)
        true[rng.choice(n, 6 * (c - 1), replace=False)] = np.repeat(np.arange(1, c), 6)
    feats = (mu[true] + rng.normal(size=(n, d))).astype(np.float32)
    labels = true.copy()
    energy = rng.normal(size=n)
    if degenerate:
        energy[true == 0] -= 10  # class 0 is always the most confident
    if wrong_low_energy:  # the confident half is mislabelled: lowest energy is clearly the worst policy
        low = energy < np.median(energy)
        labels[low] = (true[low] + 1) % c
    h_true = rng.integers(0, c, 150)
    t_true = rng.integers(0, c, 60)
    return {
        "labels": labels, "energy": energy, "entropy": rng.random(n), "pool_feats": feats,
        "heldout_feats": (mu[h_true] + rng.normal(size=(150, d))).astype(np.float32), "heldout_labels": h_true,
        "target_feats": (mu[t_true] + rng.normal(size=(60, d))).astype(np.float32), "n_classes": c,
    }


def select_policy(pol: auto.Policy, k: int, **kw):
    return auto.selector(pol, **kw)(k)


def names(c: int) -> tuple[str, ...]:
    return tuple(f"class{i}" for i in range(c))


def sender(w: dict, confidence: np.ndarray | None = None, nearest_key: np.ndarray | None = None) -> auto.Decider:
    """The world's teacher as the one decider: every held-out row is its own."""
    if nearest_key is None and w.get("target_feats") is not None:
        nearest_key = auto.nearest_target_key(w["pool_feats"], w["target_feats"])
    return auto.Decider(w["labels"], w["energy"], w["entropy"], np.arange(len(w["heldout_labels"])), confidence,
                        nearest_key)


def search(w: dict, size_of, **kw) -> auto.AutoChoice:
    deciders = kw.pop("deciders", None) or [sender(w, kw.pop("confidence", None), kw.pop("nearest_key", None))]
    kw.setdefault("head_steps", STEPS)
    return auto.search(deciders=deciders, pool_feats=w["pool_feats"], heldout_feats=w["heldout_feats"],
                       heldout_labels=w["heldout_labels"], n_classes=w["n_classes"], size_of=size_of, **kw)


def run(w: dict, receiver: str = "plain", **kw) -> auto.AutoChoice:
    return search(w, auto.payload_sizer(FP, len(w["labels"]), names(w["n_classes"]), receiver), **kw)


def smallest(w: dict, receiver: str = "plain") -> int:
    """Bytes of a one-image payload: budgets are set relative to it, so a codec change cannot break the tests."""
    size_of = auto.payload_sizer(FP, len(w["labels"]), names(w["n_classes"]), receiver)
    return size_of(np.array([0]), w["labels"][:1], 0.1234)


def same_rows(mode: str, rows: np.ndarray, labels: np.ndarray):
    """A receiver mode that trains on the payload alone: forecasts as plain, named as ``mode``."""
    from plada.receiver import Expansion

    return Expansion(rows, labels, None, {"mode": mode})


@pytest.mark.parametrize("extra", [20, 60, 150])
def test_never_exceeds_budget(extra: int) -> None:
    w = world()
    budget = smallest(w, "selftrain") + extra
    ch = run(w, "selftrain", budget_bytes=budget, receivers=("selftrain",), expand=same_rows)
    assert ch.receiver == "selftrain"
    assert ch.payload_bytes <= budget
    assert all(r["bytes"] <= budget for r in ch.candidates)
    assert sum(r["chosen"] for r in ch.candidates) == 1
    # the file the pipeline will write is exactly the size the search measured
    p = payload.Payload(FP, len(w["labels"]), names(3), ch.indices, ch.labels, forecast=ch.forecast,
                        receiver="selftrain")
    data = payload.encode(p)
    assert len(data) == ch.payload_bytes
    got = payload.decode(data)
    assert got.count == ch.k == len(ch.indices) and got.receiver == "selftrain"
    assert got.forecast == round(ch.forecast, 4)
    # the largest size per policy is really the largest: one more image does not fit (with the room kept for
    # the real forecast's digits, which move the compressed header by a byte or so)
    assert all(r["bytes"] <= budget - auto.FORECAST_SLACK for r in ch.candidates if not r["chosen"])
    size_of = auto.payload_sizer(FP, len(w["labels"]), names(3), "selftrain")
    tops: dict[str, dict] = {}
    for r in ch.candidates:
        if r["k"] > tops.get(r["name"], {"k": 0})["k"]:
            tops[r["name"]] = r
    for r in tops.values():
        if r["k"] == len(w["labels"]):
            continue
        pol = auto.Policy(r["policy"], r["safety_share"], r["alpha"])
        key = auto.policy_key(pol, w["energy"], w["entropy"], seed=0,
                              nearest_key=auto.nearest_target_key(w["pool_feats"], w["target_feats"]))
        idx = select.select(w["labels"], key, r["k"] + 1, 3, safety_share=pol.safety_share, alpha=pol.alpha)
        assert size_of(idx, w["labels"][idx], 0.1234) > budget - auto.FORECAST_SLACK
    # every policy got at least one size (whole-groups needs the pool's groups, which this world lacks)
    assert set(tops) == {p.name for p in auto.DEFAULT_POLICIES if p.policy != auto.WHOLE_GROUPS}


def test_deterministic_given_seed() -> None:
    w = world()
    a = run(w, budget_bytes=smallest(w) + 40, seed=3)
    b = run(w, budget_bytes=smallest(w) + 40, seed=3)
    assert a.summary() == b.summary()
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_forecast_is_held_out_accuracy_and_best_policy_wins() -> None:
    w = world(wrong_low_energy=True)
    ch = run(w, budget_bytes=smallest(w) + 80)
    assert ch.policy == "highest-energy"
    low = max(r["forecast"] for r in ch.candidates if r["name"] == "lowest-energy")
    assert ch.forecast > low + 0.3
    chosen = next(r for r in ch.candidates if r["chosen"])
    assert chosen["forecast_seeds"] == 3  # the winner is always a finalist, re-forecast over seeds 0, 1, 2
    accs = []
    for s in range(3):
        with torch_threads(1):  # the search trains its heads on one thread; same data, seed, threads: same head
            wt, b = train_head(w["pool_feats"][ch.indices], w["labels"][ch.indices], 3, steps=STEPS, seed=s)
        accs.append(float(((w["heldout_feats"] @ wt.T + b).argmax(1) == w["heldout_labels"]).mean()))
    assert ch.forecast == float(np.mean(accs))


def test_finalists_are_reforecast_over_seeds_and_only_they_can_win() -> None:
    w = world(wrong_low_energy=True)
    one = run(w, budget_bytes=smallest(w) + 80, finalist_seeds=1)
    assert {r["forecast_seeds"] for r in one.candidates} == {1}
    ch = run(w, budget_bytes=smallest(w) + 80, finalist_band=0.05)
    top = max(r["forecast"] for r in one.candidates)
    for r1, r in zip(one.candidates, ch.candidates, strict=True):
        assert (r["forecast_seeds"] == 3) == (r1["forecast"] >= top - 0.05)  # band measured on the seed-0 forecast
        if r["forecast_seeds"] == 1:
            assert r["forecast"] == r1["forecast"]
    assert next(r for r in ch.candidates if r["chosen"])["forecast_seeds"] == 3
    with pytest.raises(PladaError, match="finalist_seeds"):
        run(w, budget_bytes=smallest(w) + 80, finalist_seeds=0)


def test_degenerate_teacher_keeps_every_predicted_class() -> None:
    w = world(c=5, degenerate=True)
    assert np.bincount(w["labels"]).min() == 6 and (w["labels"] == 0).mean() > 0.9
    budget = smallest(w) + 60
    # max_k: the whole (nearly one-class) pool compresses to almost nothing and would trivially keep every class
    ch = run(w, budget_bytes=budget, max_k=len(w["labels"]) // 2)
    plain = [r for r in ch.candidates if r["name"] == "lowest-energy"]
    assert plain and all(r["classes_kept"] == 1 for r in plain)  # the collapse the guard is for
    assert set(np.unique(ch.labels)) == set(range(5))
    assert ch.payload_bytes <= budget


def test_single_class_teacher_does_not_crash() -> None:
    w = world(c=3)
    w["labels"] = np.zeros_like(w["labels"])
    budget = smallest(w) + 30
    ch = run(w, budget_bytes=budget)
    assert ch.payload_bytes <= budget and set(np.unique(ch.labels)) == {0}
    assert 0 <= ch.forecast <= 1


def test_fixed_keep_varies_only_the_policy() -> None:
    w = world()
    ch = run(w, k=40)
    assert {r["k"] for r in ch.candidates} == {40} and ch.k == 40 and ch.budget_bytes is None
    ranked = {p.name for p in auto.DEFAULT_POLICIES if p.policy != auto.WHOLE_GROUPS}  # no groups in this world
    assert {r["name"] for r in ch.candidates} == ranked


def test_non_monotone_sizes_are_guarded() -> None:
    """A caller's sizer (or a codec) whose bytes wobble with k: every candidate is still measured to fit."""
    w = world()

    def size_of(indices: np.ndarray, labels: np.ndarray, forecast: float | None, receiver: str | None = None) -> int:
        k = len(indices)
        return 3 * k + (10_000 if k % 7 == 3 else 0) + (500 if 40 <= k < 60 else 0)

    ch = search(w, size_of, budget_bytes=300)
    assert all(size_of(np.zeros(r["k"]), None, None) <= 300 for r in ch.candidates)
    assert all(r["bytes"] <= 300 for r in ch.candidates) and ch.payload_bytes <= 300
    assert max(r["k"] for r in ch.candidates) <= 100


def test_policies_without_their_inputs_are_skipped() -> None:
    w = world()
    w["entropy"] = None
    names_tried = {r["name"] for r in run(w, k=20).candidates}
    assert "lowest-entropy" not in names_tried and "highest-energy" in names_tried


def test_budget_too_small_raises() -> None:
    w = world()
    with pytest.raises(PladaError, match="too small"):
        run(w, budget_bytes=smallest(w) - 30)  # - 30: shorter policy names make shorter headers
    with pytest.raises(PladaError, match="exactly one"):
        run(world(), budget_bytes=500, k=3)
    with pytest.raises(PladaError, match="exactly one"):
        run(world())


def test_nearest_target_key_matches_brute_force_and_is_chunked() -> None:
    rng = np.random.default_rng(1)
    pool, tgt = rng.normal(size=(1000, 8)), rng.normal(size=(37, 8))
    key = auto.nearest_target_key(pool, tgt, chunk=64)
    pn = pool / np.linalg.norm(pool, axis=1, keepdims=True)
    tn = tgt / np.linalg.norm(tgt, axis=1, keepdims=True)
    np.testing.assert_allclose(key, -(pn @ tn.T).max(1), atol=1e-5)
    with pytest.raises(PladaError):
        auto.nearest_target_key(pool, rng.normal(size=(3, 5)))
    w = world()
    ch = run(w, k=30, policies=[auto.Policy(auto.NEAREST)])  # target features given: nearest-target is tried
    assert ch.policy == auto.NEAREST
    w.pop("target_feats")
    assert auto.NEAREST not in {r["policy"] for r in run(w, k=30).candidates}  # and skipped without them


def test_holdout_split() -> None:
    fit, held = auto.holdout_split(1000, 0.1, seed=0, limit=50)
    assert len(held) == 50 and len(fit) == 950 and not set(fit) & set(held)
    assert (np.diff(fit) > 0).all() and (np.diff(held) > 0).all()
    np.testing.assert_array_equal(held, auto.holdout_split(1000, 0.1, seed=0, limit=50)[1])


@pytest.mark.slow
def test_auto_policy_quick_benchmark(tiny_data: Path, cache: Path, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import auto_policy

    quick = auto_policy.quick_config  # a 1-step teacher: the teacher is not what this test is about
    monkeypatch.setattr(auto_policy, "quick_config", lambda cfg: dataclasses.replace(quick(cfg), teacher_samples=120))
    code = auto_policy.main(["--quick", "--data", str(tiny_data), "--pool", "tinypool", "--targets", "tinytarget",
                             "--budgets", "750", "1500", "5000", "--out-dir", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "results" / "auto_policy_quick.json").read_text())
    r = res["targets"]["tinytarget"]
    # the tiny teacher used all of train: as in send, auto.DECIDERS deciders, each on its own 20% slice (24 of 120)
    assert r["heldout"]["refit"] and (r["folds"], r["holdout_fraction"]) == (auto.DECIDERS, auto.HOLDOUT_FRACTION)
    assert r["heldout"]["images"] == round(120 * auto.HOLDOUT_FRACTION) * auto.DECIDERS
    assert r["send"] == "decider"
    for budget in res["config"]["budgets"]:
        cell = r["budgets"][str(budget)]
        assert cell["auto"]["payload_bytes"] <= budget
        assert cell["auto"]["test_seeds"] == 2  # the choice is always measured over every eval seed
        assert 0 <= cell["auto"]["forecast"] <= 1 and 0 <= cell["auto"]["test_accuracy"] <= 1
        assert 0 <= cell["hindsight"]["test_accuracy"] <= 1
        assert cell["gap"] <= 1e-12  # the hindsight best is at least the auto choice
        lo, hi = cell["gap_ci95"]
        assert lo - 1e-9 <= cell["gap"] <= hi + 1e-9  # the interval holds the gap it is around
        assert all("test_accuracy" in c and c["bytes"] <= budget for c in cell["candidates"])
    assert res["config"]["budgets"] == [750, 1500, 5000]
    assert max(c["k"] for c in r["budgets"]["5000"]["candidates"]) == res["pool_size"]  # 5 KB holds the whole pool
    summ = res["fixed_policy_summary"]
    assert set(summ) == {str(b) for b in res["config"]["budgets"]}
    assert all(v["best_fixed"] in v["fixed_mean"] for v in summ.values())
    md = (tmp_path / "benchmarks" / "reports" / "AUTO_POLICY_quick.md").read_text()
    assert "python -m benchmarks.auto_policy --quick" in md and "tinytarget" in md and "Against the goals" in md
    assert "One fixed policy for every target" in md
    # the markdown can be rewritten from the JSON alone, identically (the JSON's sorted keys put back in run order)
    (tmp_path / "benchmarks" / "reports" / "AUTO_POLICY_quick.md").unlink()
    results = tmp_path / "results" / "auto_policy_quick.json"
    assert auto_policy.main(["--markdown-from", str(results), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "benchmarks" / "reports" / "AUTO_POLICY_quick.md").read_text() == md
    assert auto_policy.main(["--markdown-from", str(tmp_path / "none.json")]) == 2

    # the default sends the decider's own selection; hindsight is the full teacher's field (its rows unforecast)
    cell = r["budgets"]["1500"]
    assert cell["auto"]["decider"] in range(auto.DECIDERS)
    assert {c["decider"] for c in cell["candidates"]} == {*range(auto.DECIDERS), None}  # all deciders competed
    fixed = [c for c in cell["candidates"] if c["decider"] is None]
    assert fixed and all(c["forecast"] is None and not c["chosen"] for c in fixed)
    assert cell["hindsight"]["test_accuracy"] == max(c["test_accuracy"] for c in fixed)
    assert cell["hindsight_any"]["test_accuracy"] >= cell["auto"]["test_accuracy"]
    assert "[fold 0]" in md

    # the ladder of keep sizes: random (every k exact) is tried at an eighth of its largest fitting size too
    ks = sorted({c["k"] for c in cell["candidates"] if c["policy"] == "random" and c["decider"] == 0})
    assert len(ks) == len(auto.DEFAULT_FRACTIONS) and ks[0] == ks[-1] // 8


def test_validation_split_is_carved_from_train_whole_groups_and_named_apart() -> None:
    """--eval-split validation's V: a seeded 20% of train (at most VAL_LIMIT), whole tracks where grouped, and
    named so no feature or teacher cache keyed by split name and length can take it for another split."""
    from benchmarks import auto_policy
    from plada.data import Split
    from plada.features import split_key

    files = [f"c{t % 2}/{t:05d}_{f:05d}.png" for t in range(40) for f in range(5)]  # 40 tracks of 5 frames
    train = Split("t", "train", np.zeros((200, 4, 4, 3), np.uint8), np.arange(200) // 5 % 2, ["c0", "c1"], files)
    cfg = auto_policy.AutoConfig()
    for pattern, cap, size in ((None, 5000, 40), (None, 12, 12), (r"^(\d+)_", 5000, 40), (r"^(\d+)_", 12, 10)):
        cfg.val_limit = cap
        fit, val = auto_policy.carve_validation(train, cfg, pattern)
        assert len(val) == size and len(fit) + len(val) == 200 and not set(fit.files) & set(val.files)
        if pattern:  # no track straddles the two sides
            assert not {f.split("_")[0] for f in fit.files} & {f.split("_")[0] for f in val.files}
        again = auto_policy.carve_validation(train, cfg, pattern)[1]
        assert again.files == val.files and again.split == val.split  # seeded: one V
        assert val.split.startswith(f"val{auto_policy.VAL_SEED}-") and fit.split == f"train-minus-{val.split}"
        for n, name in ((len(val), val.split), (len(fit), fit.split)):  # a key no test or train split can have
            assert split_key(Path("src"), name, n) not in {split_key(Path("src"), s, n) for s in ("test", "train")}
    other = auto_policy.carve_validation(train, dataclasses.replace(cfg, val_seed=3), None)[1]
    assert other.split != val.split  # another V, another name


def test_auto_policy_merge_of_per_target_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Per-target runs merge into the one run they were cut from; runs that differ otherwise are refused."""
    from benchmarks import auto_policy

    whole = json.loads((Path(__file__).parents[1] / "results" / "auto_policy.json").read_text())
    parts, targets = [], whole["config"]["targets"]
    cmds = whole["command"].split(" && ")  # a merged record names one command per target
    for i, t in enumerate(targets):  # the run cut into one run per target, as separate sessions make them
        part = {**{k: v for k, v in whole.items() if k != "merged_from"}, "targets": {t: whole["targets"][t]},
                "config": {**whole["config"], "targets": [t]},
                "command": cmds[i] if len(cmds) == len(targets) else whole["command"]}
        parts.append(tmp_path / t / "auto_policy.json")
        parts[-1].parent.mkdir()
        parts[-1].write_text(json.dumps(part))
    out = tmp_path / "merged"
    assert auto_policy.main(["--merge", *map(str, parts), "--out-dir", str(out)]) == 0
    res = json.loads((out / "results" / "auto_policy.json").read_text())
    assert res["targets"] == whole["targets"] and res["config"] == whole["config"]
    assert res["fixed_policy_summary"] == whole["fixed_policy_summary"]
    assert res["merged_from"] == list(map(str, parts)) and res["command"].count(" && ") == len(parts) - 1
    md = (out / "benchmarks" / "reports" / "AUTO_POLICY.md").read_text()
    assert all(f"| {t} |" in md for t in whole["targets"]) and "Validation run" not in md
    capsys.readouterr()

    def refused(*argv: str) -> None:
        assert auto_policy.main([*argv, "--out-dir", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("benchmark: error:") and err.count("\n") == 1
        assert not (tmp_path / "refused").exists()

    other = tmp_path / "other_pool.json"
    other.write_text(json.dumps({**json.loads(parts[1].read_text()), "pool_fingerprint": "0" * 64}))
    refused("--merge", str(parts[0]), str(other))  # another pool
    other.write_text(json.dumps({**json.loads(parts[1].read_text()),
                                 "config": {**whole["config"], "targets": [whole["config"]["targets"][1]],
                                            "proxy_steps": 7}}))
    refused("--merge", str(parts[0]), str(other))  # another setting
    refused("--merge", str(parts[0]), str(parts[0]))  # one target twice
    refused("--merge", str(parts[0]), str(parts[1]), "--eval-split", "validation")  # test figures named _val
    refused("--merge", str(parts[0]), str(parts[1]), "--quick")
    refused("--merge", str(parts[0]), str(tmp_path / "none.json"))


@pytest.mark.slow
def test_auto_policy_quick_validation_mode(tiny_data: Path, cache: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """--eval-split validation never reads the test split, trains no teacher on V, measures on V's own features
    (not a same-length split's cached ones), writes _val files, and per-target _val runs merge."""
    from benchmarks import auto_policy, paper
    from plada import data, features, pipeline
    from plada.train import predict

    quick = auto_policy.quick_config  # a 1-step teacher, as in test_auto_policy_quick_benchmark
    monkeypatch.setattr(auto_policy, "quick_config", lambda cfg: dataclasses.replace(quick(cfg), teacher_samples=120))
    src = data.load_source("tinytarget", tiny_data, progress=False)
    fm = features.feature_model("efficientnet-lite0", 32)  # the quick student's feature space
    n_val, n_fit = 24, 96  # 20% of tinytarget's 120 train images
    for name, n in (("test", n_val), ("train", n_val), ("train", n_fit)):  # blank images' features under these keys
        features.cached_features(fm, np.zeros((n, 32, 32, 3), np.uint8), features.split_key(src.root, name, n),
                                 progress=False)
    real_split = data.Source.split

    def split(self, name: str):
        assert name != "test", "a validation run read the test split"
        return real_split(self, name)

    monkeypatch.setattr(data.Source, "split", split)
    teachers = []  # (files a teacher could train on, split it was measured on)
    for mod in (paper, pipeline):
        def spy(train, test, *a, real=mod.train_teacher, **k):
            teachers.append((set(train.files), test))
            return real(train, test, *a, **k)
        monkeypatch.setattr(mod, "train_teacher", spy)
    feats, prefixes = {}, []

    def cached(fm_, images, key, *a, real=auto_policy.cached_features, **k):
        feats[key] = (np.asarray(images), np.asarray(real(fm_, images, key, *a, **k)))
        return feats[key][1]

    def rows(fm_, images, idx, prefix, *a, real=auto_policy.rows_features, **k):
        prefixes.append(prefix)
        return real(fm_, images, idx, prefix, *a, **k)

    monkeypatch.setattr(auto_policy, "cached_features", cached)
    monkeypatch.setattr(auto_policy, "rows_features", rows)
    argv = ["--quick", "--eval-split", "validation", "--data", str(tiny_data), "--pool", "tinypool",
            "--targets", "tinytarget", "--budgets", "1500"]
    assert auto_policy.main([*argv, "--out-dir", str(tmp_path)]) == 0
    assert not (tmp_path / "results" / "auto_policy_quick.json").exists()
    res = json.loads((tmp_path / "results" / "auto_policy_quick_val.json").read_text())
    assert res["config"]["eval_split"] == "validation" and res["config"]["val_seed"] == auto_policy.VAL_SEED
    assert "--eval-split validation" in res["command"]
    r = res["targets"]["tinytarget"]
    assert (r["validation"]["images"], r["validation"]["train_images_left"]) == (n_val, n_fit)
    assert (r["test_images"], r["train_images"]) == (n_val, n_fit) and r["heldout"]["refit"]
    val = teachers[0][1]  # the teacher is measured on V, a part of the train split
    assert val.split == r["validation"]["split"] and len(val) == n_val
    assert {f"train/{f}" for f in val.files} <= set(src.paths)
    assert len(teachers) == 1 + auto.DECIDERS and all(not fit & set(val.files) for fit, _ in teachers)
    # features: V's own key, never a test or train key (poisoned above), and V's own images' features
    key = features.split_key(src.root, val.split, n_val)
    assert all(k.startswith("pool/") or k == key for k in feats)
    fresh = predict(fm, val.images, progress=False, features=True)
    np.testing.assert_allclose(feats[key][1], fresh, rtol=1e-4, atol=1e-5)
    assert prefixes and all(p.startswith(features.split_key(src.root, f"train-minus-{val.split}", n_fit) + "/")
                            for p in prefixes)
    md = (tmp_path / "benchmarks" / "reports" / "AUTO_POLICY_quick_val.md").read_text()
    assert "Validation run" in md and "never on the test split" in md and "| auto val |" in md
    assert "| auto test |" not in md

    # a second target's run (this one renamed), then the two merged under the _val names
    twin = tmp_path / "twin" / "auto_policy_quick_val.json"
    twin.parent.mkdir()
    twin.write_text(json.dumps({**res, "targets": {"tinytwin": r},
                                "config": {**res["config"], "targets": ["tinytwin"]}}))
    out = tmp_path / "merged"
    first = str(tmp_path / "results" / "auto_policy_quick_val.json")
    assert auto_policy.main(["--quick", "--eval-split", "validation", "--merge", first, str(twin),
                             "--out-dir", str(out)]) == 0
    merged = json.loads((out / "results" / "auto_policy_quick_val.json").read_text())
    assert list(merged["targets"]) == merged["config"]["targets"] == ["tinytarget", "tinytwin"]
    assert merged["merged_from"] == [first, str(twin)]
    assert "tinytwin" in (out / "benchmarks" / "reports" / "AUTO_POLICY_quick_val.md").read_text()
    assert auto_policy.main(["--quick", "--merge", first, str(twin), "--out-dir", str(out)]) == 2  # not as test


def test_forecast_ties_go_to_more_images() -> None:
    """A tie carries no evidence, so the bigger labelled set wins it (not the smaller payload)."""
    w = world(n=3000, c=1)  # one class: every candidate predicts it and is right on every held-out image
    choice = run(w, budget_bytes=smallest(w) + 100)
    assert {c["forecast"] for c in choice.candidates} == {1.0}
    assert len({c["k"] for c in choice.candidates}) > 1
    assert choice.k == max(c["k"] for c in choice.candidates)
    assert choice.k < 3000 and choice.payload_bytes > min(c["bytes"] for c in choice.candidates)


def grouped_world(seed: int = 0) -> dict:
    """World of 12 folders of 50 pool images, each folder mostly one class: whole folders are cheap to send."""
    w = world(n=600, seed=seed)
    rng = np.random.default_rng(seed + 1)
    groups = np.repeat(np.arange(12), 50)
    labels = np.where(rng.random(600) < 0.8, groups % 3, rng.integers(0, 3, 600))
    w["labels"] = labels.astype(np.int64)
    logits = rng.normal(size=(600, 3)) + 2.0 * np.eye(3)[labels]
    return w, groups, rate.confidence(logits)


def test_whole_groups_candidates_are_whole_folders_within_budget() -> None:
    w, groups, conf = grouped_world()
    budget = smallest(w) + 60
    ch = run(w, budget_bytes=budget, groups=groups, confidence=conf)
    rows = [r for r in ch.candidates if r["policy"] == auto.WHOLE_GROUPS]
    assert {r["name"] for r in rows} == {"whole-groups tau=0", "whole-groups tau=1"}
    for r in rows:
        assert r["bytes"] <= budget and r["kept"] % 50 == 0 and 0 < r["kept"] <= r["k"]
        idx, sent = select_policy(auto.Policy(r["policy"], tau=r["tau"]), r["k"], labels=w["labels"],
                                       energy=w["energy"], entropy=w["entropy"], n_classes=3, groups=groups,
                                       confidence=conf)
        assert len(idx) == r["kept"] and set(np.unique(groups[idx]).tolist()) == set(groups[idx].tolist())
        if r["tau"] == 1.0:  # every folder sent with one label
            assert all(len(np.unique(sent[groups[idx] == g])) == 1 for g in np.unique(groups[idx]))
    # tau=1 folders cost far less than the same images with the teacher's labels
    big = {r["tau"]: r["kept"] for r in rows}
    assert big[1.0] >= big[0.0]


def test_whole_groups_choice_round_trips_through_select_policy() -> None:
    w, groups, conf = grouped_world()
    budget = smallest(w) + 60
    size_of = auto.payload_sizer(FP, 600, names(3))
    ch = search(w, size_of, budget_bytes=budget, groups=groups, confidence=conf,
                policies=[auto.Policy(auto.WHOLE_GROUPS, tau=1.0)])
    assert ch.policy == auto.WHOLE_GROUPS and ch.tau == 1.0 and ch.rule.tau == 1.0
    assert ch.payload_bytes <= budget and len(ch.indices) % 50 == 0
    again = select_policy(ch.rule, ch.k, labels=w["labels"], energy=w["energy"], entropy=w["entropy"],
                               n_classes=3, groups=groups, confidence=conf)
    np.testing.assert_array_equal(again.indices, ch.indices)
    np.testing.assert_array_equal(again.labels, ch.labels)
    with pytest.raises(PladaError, match="groups"):
        select_policy(ch.rule, ch.k, labels=w["labels"], energy=w["energy"], entropy=w["entropy"], n_classes=3)


@pytest.mark.parametrize("grouped", [False, True])
def test_fold_split_disjoint_slices(grouped: bool) -> None:
    """``frac`` with several folds: each teacher goes without its own slice; the first is the one-teacher slice."""
    rng = np.random.default_rng(3)
    groups = rng.permutation(np.repeat(np.arange(60), rng.integers(1, 6, 60))) if grouped else None
    n = 100 if groups is None else len(groups)
    slices = auto.fold_split(n, 3, seed=5, groups=groups, frac=0.2)
    (fit1, held1), = auto.fold_split(n, 1, seed=5, groups=groups, frac=0.2)
    assert np.array_equal(slices[0][1], held1) and np.array_equal(slices[0][0], fit1)  # its teacher is shared
    seen: set[int] = set()
    for j, (fit, held) in enumerate(slices):
        assert len(fit) + len(held) == n and not set(fit) & set(held) and not seen & set(held)
        seen |= set(held.tolist())
        if grouped:
            assert not set(groups[fit]) & set(groups[held])
            assert 0.2 * n * (j + 1) <= len(seen) <= 0.2 * n * (j + 1) + 5  # slice ends within one group
        else:
            assert len(held) == 20
    assert len(seen) < n  # unlike cross-fitting, the rest of train is never held out
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(slices, auto.fold_split(n, 3, seed=5, groups=groups,
                                                                                    frac=0.2), strict=True))
    with pytest.raises(PladaError, match="leave no train image"):
        auto.fold_split(n, 5, seed=5, groups=groups, frac=0.2)
    with pytest.raises(PladaError, match="need at least 4 groups" if grouped else "need more than 6"):
        auto.fold_split(8 if grouped else 5, 3, groups=np.array([0, 0, 0, 1, 1, 1, 2, 2]) if grouped else None,
                        frac=0.3)


def test_decider_plan() -> None:
    """What a user asks for -> (teachers, slice each): the defaults where not given, nothing guessed."""
    assert auto.decider_plan() == (auto.DECIDERS, auto.HOLDOUT_FRACTION)
    assert auto.decider_plan(3, 0.25) == (3, 0.25)
    assert auto.decider_plan(1) == (1, auto.HOLDOUT_FRACTION)
    n, f = auto.decider_plan()
    assert sum(len(h) for _, h in auto.fold_split(100, n, frac=f)) == round(100 * f) * n  # disjoint slices
    for args, msg in (((5, 0.2), "leave no train image"), ((0,), "positive integer"), ((True,), "positive integer"),
                      ((1, 1.0), r"in \(0, 1\)")):
        with pytest.raises(PladaError, match=msg):
            auto.decider_plan(*args)


def test_search_forecasts_do_not_depend_on_workers() -> None:
    """Proxy heads trained two at a time give the table one at a time gives, bit for bit."""
    w = world(wrong_low_energy=True)
    budget = smallest(w) + 80
    one = run(w, budget_bytes=budget, workers=1)
    two = run(w, budget_bytes=budget, workers=2)
    assert one.summary() == two.summary()


def test_name_groups_from_file_names() -> None:
    files = ["a/00001_00000.png", "a/00001_00006.png", "a/00002_00000.png", "b/00001_00000.png", "b/other.png",
             "b/more.png"]
    g = auto.name_groups(files, r"^(\d+)_")
    assert g[0] == g[1] and len({g[0], g[2], g[3], g[4], g[5]}) == 5  # same track; class splits; no match: alone
    whole = auto.name_groups(["a/x1.png", "a/x1b.png", "a/y.png"], r"x1")  # no capture group: the whole match
    assert whole[0] == whole[1] != whole[2]
    with pytest.raises(PladaError, match="regular expression"):
        auto.name_groups(files, "(")


def test_grouped_folds_keep_each_group_in_one_fold() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 9, 40))  # 40 groups of 1-8 images
    rng.shuffle(groups)
    n = len(groups)
    splits = auto.fold_split(n, 3, seed=2, groups=groups)  # default grouped slices, disjoint
    held = np.concatenate([h for _, h in splits])
    assert len(set(held.tolist())) == len(held) < n
    for fit, h in splits:
        assert not set(groups[fit]) & set(groups[h]) and len(fit) + len(h) == n
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, auto.fold_split(n, 3, seed=2, groups=groups),
                                                          strict=True))
    (fit, h), = auto.fold_split(n, 1, seed=2, groups=groups, frac=0.1)
    assert not set(groups[fit]) & set(groups[h]) and 0.1 * n <= len(h) <= 0.1 * n + 8
    (fit, h2), = auto.fold_split(n, 1, seed=2, groups=groups, frac=0.25)  # a bigger slice: more whole groups
    assert not set(groups[fit]) & set(groups[h2]) and 0.25 * n <= len(h2) <= 0.25 * n + 8
    assert set(h) <= set(h2)  # the same seeded group order, filled further
    (fit, hd), = auto.fold_split(n, 1, seed=2, groups=groups)  # the default slice, of whole groups
    f = auto.HOLDOUT_FRACTION
    assert f > 0.1 and f * n <= len(hd) <= f * n + 8 and set(h) <= set(hd)
    assert len(auto.fold_split(100, 1, seed=4)[0][1]) == round(100 * auto.HOLDOUT_FRACTION)  # by image
    assert len(auto.fold_split(100, 1, seed=4, frac=0.3)[0][1]) == 30
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(PladaError, match="fraction"):
            auto.fold_split(n, 1, groups=groups, frac=bad)
    with pytest.raises(PladaError, match="at least 4 groups"):
        auto.fold_split(6, 3, groups=np.array([0, 0, 0, 1, 1, 1]))
    with pytest.raises(PladaError, match="one integer group id"):
        auto.fold_split(6, 3, groups=np.arange(5))


def test_train_heads_on_threads_equal_one_by_one() -> None:
    """Threads share torch's global RNG, so a head must draw only from its own generators to stay exact."""
    import torch

    from plada.train import train_heads

    rng = np.random.default_rng(1)
    f = rng.standard_normal((3000, 1280)).astype(np.float32)
    y = rng.integers(0, 43, 3000)
    jobs = [((lambda s=s: f[s * 500:]), y[s * 500:], 43, 150, s) for s in range(4)]
    state = torch.get_rng_state()
    par = train_heads(jobs, workers=2)
    assert torch.equal(state, torch.get_rng_state())  # the global generator was not drawn from
    for (feats, lab, c, steps, s), (w2, b2) in zip(jobs, par, strict=True):
        with torch_threads(1):
            w1, b1 = train_head(feats(), lab, c, steps=steps, seed=s)
        assert np.array_equal(w1, w2) and np.array_equal(b1, b2)


def test_paired_bootstrap_interval() -> None:
    from benchmarks.auto_policy import paired_bootstrap

    rng = np.random.default_rng(0)
    a = (rng.random(4000) < 0.6).astype(float)
    assert paired_bootstrap(a, a) == [0.0, 0.0]  # same students: no gap, whatever the images
    lo, hi = paired_bootstrap(a, np.zeros(4000))
    assert lo < a.mean() < hi and hi - lo < 0.04  # about +-1.96 * sqrt(0.24 / 4000) = +-0.015
    b = a.copy()
    flip = rng.choice(4000, 200, replace=False)
    b[flip] = 1 - b[flip]
    lo, hi = paired_bootstrap(a, b)
    assert lo <= (a - b).mean() <= hi


def two_deciders(w: dict, seed: int = 5) -> list[auto.Decider]:
    """Two fold teachers whose labels and energies differ from the sender's (and from each other's)."""
    rng = np.random.default_rng(seed)
    near = auto.nearest_target_key(w["pool_feats"], w["target_feats"])
    halves = np.array_split(np.arange(len(w["heldout_labels"])), 2)
    out = []
    for h in halves:
        lab = w["labels"].copy()
        flip = rng.random(len(lab)) < 0.2
        lab[flip] = (lab[flip] + 1) % w["n_classes"]
        out.append(auto.Decider(lab, w["energy"] + rng.normal(size=len(lab)), w["entropy"], h, nearest_key=near,
                                fold=len(out)))
    return out


def test_send_decider_sends_exactly_the_selection_it_forecast() -> None:
    """Each candidate is one decider's own selection, sized with its own labels, forecast on
    its own rows only, and the one chosen is sent as it is, with the fold named in the report."""
    w = world(wrong_low_energy=True)
    budget = smallest(w) + 80
    decs = two_deciders(w)
    ch = run(w, budget_bytes=budget, finalist_seeds=1, deciders=decs)
    assert {r["decider"] for r in ch.candidates} == {0, 1} and ch.decider in (0, 1)
    assert all(r["bytes"] <= budget for r in ch.candidates) and ch.payload_bytes <= budget
    d = decs[ch.decider]
    again = select_policy(ch.rule, ch.k, labels=d.labels, energy=d.energy, entropy=d.entropy, n_classes=3,
                               nearest_key=d.nearest_key)
    assert np.array_equal(ch.indices, again.indices) and np.array_equal(ch.labels, again.labels)
    assert not np.array_equal(ch.labels, w["labels"][ch.indices])  # the decider's labels, not the sender's
    with torch_threads(1):
        wt, b = train_head(w["pool_feats"][ch.indices], ch.labels, 3, steps=STEPS, seed=0)
    hits = ((w["heldout_feats"][d.rows] @ wt.T + b).argmax(1) == w["heldout_labels"][d.rows]).sum()
    assert ch.forecast == hits / len(d.rows)  # scored on its own fold only
    assert ch.summary()["decider"] == ch.fold and ch.heldout_images == len(d.rows)
    size_of = auto.payload_sizer(FP, len(w["labels"]), names(3))
    assert size_of(ch.indices, ch.labels, ch.forecast) == ch.payload_bytes  # sized with the header it will carry
    # each decider's candidates are what plan_candidates makes of its scores
    for j, dj in enumerate(decs):
        plan = auto.plan_candidates(
            auto.DEFAULT_POLICIES, labels=dj.labels, energy=dj.energy, entropy=dj.entropy, n_classes=3,
            size_of=size_of, budget_bytes=budget, nearest_key=dj.nearest_key, seed=0, decider=j, fold=j)
        mine = [r for r in ch.candidates if r["decider"] == j]
        assert [(c.policy.name, c.k) for c in plan] == [(r["name"].removesuffix(f" [fold {j}]"), r["k"]) for r in mine]
        assert all(c.bytes == r["bytes"] for c, r in zip(plan, mine, strict=True) if not r["chosen"])
    assert run(w, budget_bytes=budget, finalist_seeds=1, deciders=decs).summary() == ch.summary()  # deterministic


def test_search_needs_a_decider() -> None:
    w = world()
    with pytest.raises(PladaError, match="at least one deciding teacher"):
        auto.search(deciders=[], pool_feats=w["pool_feats"], heldout_feats=w["heldout_feats"],
                    heldout_labels=w["heldout_labels"], n_classes=3, size_of=len, k=3)
    with pytest.raises(PladaError, match="held-out rows"):
        run(w, budget_bytes=smallest(w) + 80,
            deciders=[auto.Decider(w["labels"], w["energy"], w["entropy"], np.array([999]))])


def test_plan_candidates_is_the_default_searchs_table() -> None:
    """The benchmark rebuilds the full teacher's field with plan_candidates: it must be the search's own."""
    w = world(wrong_low_energy=True)
    budget = smallest(w) + 80
    ch = run(w, budget_bytes=budget, finalist_seeds=1)  # world() gives target_feats: nearest-target is in
    size_of = auto.payload_sizer(FP, len(w["labels"]), names(3))
    near = auto.nearest_target_key(w["pool_feats"], w["target_feats"])
    plan = auto.plan_candidates(
        auto.DEFAULT_POLICIES, labels=w["labels"], energy=w["energy"], entropy=w["entropy"], n_classes=3,
        size_of=size_of, budget_bytes=budget, nearest_key=near, seed=0)
    assert [(c.policy.name, c.k) for c in plan] == [(r["name"], r["k"]) for r in ch.candidates]
    assert all(c.bytes == r["bytes"] for c, r in zip(plan, ch.candidates, strict=True) if not r["chosen"])


def pool_expander(w: dict, right: bool):
    """A stand-in receiver mode that adds 300 pool rows labelled truly (``right``) or one class off."""
    from plada.receiver import Expansion

    def expand(mode: str, rows: np.ndarray, labels: np.ndarray) -> Expansion:
        extra = np.setdiff1d(np.arange(300), rows)
        lab = w["true"][extra] if right else (w["true"][extra] + 1) % w["n_classes"]
        return Expansion(np.concatenate([rows, extra]), np.concatenate([labels, lab]), None, {"mode": mode})
    return expand


@pytest.mark.parametrize("right", [True, False])
def test_search_names_the_receiver_mode_its_forecast_favours(right: bool) -> None:
    w = world()
    w["true"] = w["labels"].copy()
    if right:  # every label the payload can carry is wrong: only a receiver's own true pool labels help
        w["labels"] = (w["labels"] + 1) % 3
    budget = smallest(w, "propagate") + 40
    ch = run(w, "propagate", budget_bytes=budget, receivers=("plain", "propagate"),
             expand=pool_expander(w, right))
    assert ch.receiver == ("propagate" if right else "plain")
    rows = [r for r in ch.candidates if r["receiver"] == "propagate"]
    assert rows and all(r["forecast_seeds"] == 3 for r in rows)
    chosen = [r for r in ch.candidates if r.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["receiver"] == ch.receiver and ch.payload_bytes <= budget
    size_of = auto.payload_sizer(FP, len(w["labels"]), names(3))
    assert size_of(ch.indices, ch.labels, ch.forecast, ch.receiver) == ch.payload_bytes
    assert payload.decode(size_of.last).receiver == ch.receiver


def test_search_for_one_pool_mode_sends_it_even_when_plain_forecasts_better() -> None:
    w = world(wrong_low_energy=True)
    w["true"] = w["labels"]
    ch = run(w, "propagate", k=40, receivers=("propagate",), expand=pool_expander(w, right=False))
    assert ch.receiver == "propagate"
    assert {r["receiver"] for r in ch.candidates if r.get("chosen")} == {"propagate"}


def test_search_with_pool_modes_needs_their_expansion() -> None:
    with pytest.raises(PladaError, match="expand"):
        run(world(), k=40, receivers=("plain", "selftrain"))


def test_search_with_the_real_receiver_modes_is_deterministic() -> None:
    from plada import receiver

    w = world()
    feats = w["pool_feats"]

    def expand(mode: str, rows: np.ndarray, labels: np.ndarray):
        return receiver.expand(mode, feats, rows, labels, 3, pseudo=120, k=5, graph_key=None, progress=False)

    a, b = (run(w, "propagate", k=30, receivers=receiver.LABEL_MODES, expand=expand) for _ in range(2))
    assert a.receiver == b.receiver and a.forecast == b.forecast and np.array_equal(a.indices, b.indices)
    assert {r["receiver"] for r in a.candidates} == set(receiver.LABEL_MODES)


@pytest.mark.parametrize("right", [True, False])
def test_forecast_modes_ranks_a_fixed_selection_under_each_mode(right: bool) -> None:
    w = world()
    w["true"] = w["labels"].copy()
    if right:
        w["labels"] = (w["labels"] + 1) % 3
    idx = np.arange(0, 600, 15)
    fc = auto.forecast_modes(pool_feats=w["pool_feats"], indices=idx, labels=w["labels"][idx],
                             heldout_feats=w["heldout_feats"], heldout_labels=w["heldout_labels"], n_classes=3,
                             modes=("plain", "propagate"), expand=pool_expander(w, right), head_steps=STEPS)
    assert set(fc) == {"plain", "propagate"}
    assert (fc["propagate"] > fc["plain"] + 0.3) if right else (fc["plain"] > fc["propagate"])
    with pytest.raises(PladaError, match="expand"):
        auto.forecast_modes(pool_feats=w["pool_feats"], indices=idx, labels=w["labels"][idx],
                            heldout_feats=w["heldout_feats"], heldout_labels=w["heldout_labels"], n_classes=3,
                            modes=("plain", "propagate"), expand=None)


def test_auto_defaults_replays_the_search_and_refuses_a_test_split_record(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    """benchmarks.auto_defaults judges the search's defaults by replaying its choice rule on recorded forecasts:
    the replay must pick what auto.search picked, each variant must pick only from its own candidates, and a
    test-split record is refused (defaults are never chosen on test)."""
    from benchmarks import auto_defaults

    w = world(wrong_low_energy=True)
    ch = run(w, budget_bytes=smallest(w) + 80, deciders=two_deciders(w))
    rng = np.random.default_rng(0)
    cands = [{**r, "test_accuracy": float(rng.random())} for r in ch.candidates]
    record = {"config": {"eval_split": "validation"},
              "targets": {"t": {"budgets": {"500": {"candidates": cands}}}}}
    res = auto_defaults.analyse(record)
    assert res["cells"] == ["t 500 B"]
    picks = {name: p["t 500 B"] for name, p in res["picks"].items() if p}
    default = picks[auto_defaults.DEFAULT]
    assert (default["decider"], default["k"]) == (ch.decider, ch.k)
    assert picks["ladder 1 only"]["fraction"] == 1.0
    assert picks["decider 1 alone (one decider)"]["decider"] == 1
    ceiling = max(c["test_accuracy"] for c in cands if c["decider"] is not None)
    assert picks["hindsight best candidate (not a rule: the ceiling)"]["val_accuracy"] == ceiling
    assert all(s["mean_regret"] >= 0 for name, s in res["summary"].items() if not name.startswith("full"))
    # one teacher as the only decider (it left train unseen): every rule but "one decider alone" still applies
    single = run(w, budget_bytes=smallest(w) + 80)
    one = [{**r, "test_accuracy": float(rng.random())} for r in single.candidates]
    res1 = auto_defaults.analyse({**record, "targets": {"u": {"budgets": {"500": {"candidates": one}}}}})
    assert "decider 0 alone (one decider)" not in res1["summary"]
    assert res1["summary"]["ladder 1 only"]["cells"] == res1["summary"][auto_defaults.DEFAULT]["cells"] == 1
    # a record whose chosen row the rule would not pick: the replay has drifted from auto.search, say so
    other = next(c for c in cands if not c["chosen"] and c["decider"] is not None)
    wrong = [{**c, "chosen": c is other} for c in cands]
    with pytest.raises(SystemExit, match="no longer matches"):
        auto_defaults.analyse({**record, "targets": {"t": {"budgets": {"500": {"candidates": wrong}}}}})
    path = tmp_path / "test_run.json"
    path.write_text(json.dumps({**record, "config": {"eval_split": "test"}}))
    assert auto_defaults.main([str(path), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a validation run" in err and len(err.splitlines()) == 1
    path.write_text(json.dumps(record))
    assert auto_defaults.main([str(path), "--out-dir", str(tmp_path)]) == 0
    assert "| ladder 1 only |" in (tmp_path / "AUTO_DEFAULTS.md").read_text()
