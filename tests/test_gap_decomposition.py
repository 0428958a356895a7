"""scripts/gap_decomposition.py: the two terms add up to the gap, and only decider-sent cells count."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import gap_decomposition  # noqa: E402


def cell(budget: int, auto: tuple[float, int | None], hind: float, cands: list[tuple[str, int | None, float, float]]):
    rows = [{"name": n, "decider": d, "forecast": f, "test_accuracy": t} for n, d, f, t in cands]
    return {"auto": {"budget_bytes": budget, "test_accuracy": auto[0], "decider": auto[1], "heldout_images": 20},
            "hindsight": {"test_accuracy": hind}, "candidates": rows}


def test_terms_add_up(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    res = {"config": {"search_seed": 3, "folds": 2}, "targets": {"t": {"train_images": 100, "folds": 2, "budgets": [
        cell(5000, (0.50, 1), 0.55,
             [("a [fold 0]", 0, 0.4, 0.52), ("b [fold 1]", 1, 0.6, 0.50), ("c", None, 0.9, 0.9)]),
        cell(1000, (0.30, None), 0.30, [("a", None, 0.3, 0.3)]),  # the full teacher's selection: not a decider cell
    ]}}}
    f = tmp_path / "r.json"
    f.write_text(json.dumps(res))
    out = tmp_path / "rows.json"
    assert gap_decomposition.main([str(f), "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["best_decider"] == 0.52 and row["best_decider_name"] == "a [fold 0]"  # the full teacher's row is not
    assert row["choice"] == pytest.approx(-0.02) and row["teacher"] == pytest.approx(-0.03)
    assert row["gap"] == pytest.approx(row["choice"] + row["teacher"]) and row["holdout_fraction"] == 0.2
    assert row["forecast_test_rank_corr"] == pytest.approx(-1.0)  # two candidates ranked the wrong way round
    assert "| t | 0.2 | 2 | 1 | 0 |" in capsys.readouterr().out  # one cell, not within 1 point (-5 points)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert gap_decomposition.main([str(bad)]) == 2
    assert "not a benchmarks.auto_policy results file" in capsys.readouterr().err
    assert gap_decomposition.main([str(tmp_path / "none.json")]) == 2
