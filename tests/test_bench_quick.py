"""`python -m benchmarks.paper --quick` end to end on tiny data: every table, cell and plot is produced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import paper


@pytest.mark.slow
def test_paper_quick(tiny_data: Path, cache: Path, tmp_path: Path) -> None:
    code = paper.main(["--quick", "--data", str(tiny_data), "--pool", "tinypool", "--targets", "tinytarget",
                       "--out-dir", str(tmp_path)])
    assert code == 0
    res = json.loads((tmp_path / "results" / "paper_quick.json").read_text())
    r = res["targets"]["tinytarget"]
    cfg = res["config"]
    for keep in cfg["keeps"]:
        for p in ("lowest-energy", "random"):
            c = r["cells"][f"{p}@{keep:g}"]
            assert 0 <= c["accuracy"]["mean"] <= 1 and c["accuracy"]["runs"] == len(cfg["seeds"])
            assert c["bytes"]["file"] > 0 and c["bytes"]["raw"] > 0
    for name in paper.POLICIES:
        for keep in cfg["policy_keeps"]:
            assert f"{name}@{keep:g}" in r["cells"]
    assert r["finetune"] and all(0 <= v["accuracy"] <= 1 for v in r["finetune"].values())
    assert len(r["baselines"]["jpeg-random"]) == len(cfg["per_class"]) == len(r["baselines"]["jpeg-kcenter"])
    assert r["baselines"]["int8-head"]["bytes"] > 0
    # payload bytes grow with the keep ratio, and the file is never smaller than its sections
    files = [r["cells"][f"lowest-energy@{k:g}"]["bytes"]["file"] for k in cfg["keeps"]]
    assert files[0] < files[-2]
    md = (tmp_path / "benchmarks" / "reports" / "PAPER_quick.md").read_text()
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "agrees with the paper"):
        assert heading in md
    png = tmp_path / "benchmarks" / "reports" / "plots" / "paper_quick_tinytarget.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_payload_rate_quick(tiny_data: Path, cache: Path, tmp_path: Path) -> None:
    from benchmarks import payload_rate

    code = payload_rate.main(["--quick", "--data", str(tiny_data), "--pool", "tinypool", "--targets", "tinytarget",
                              "--out-dir", str(tmp_path)])
    assert code == 0
    r = json.loads((tmp_path / "results" / "payload_rate_quick.json").read_text())["targets"]["tinytarget"]
    families = {p["family"] for p in r["new_points"]}
    assert families == {"lowest-energy+ctx", "whole-groups", "majority-relabel", "groups+exceptions"}
    assert all(p["codec"] in ("gap-zstd", "bitmap-zstd") for p in r["paper_points"])
    # the same selections with every codec allowed are never larger than with the paper's codecs only
    for p, q in zip(r["paper_points"], [p for p in r["new_points"] if p["family"] == "lowest-energy+ctx"], strict=True):
        assert q["bytes"] <= p["bytes"] and q["accuracy"] == p["accuracy"]
    front = r["new_front"]
    assert all(a["bytes"] < b["bytes"] and a["accuracy"]["mean"] < b["accuracy"]["mean"]
               for a, b in zip(front, front[1:], strict=False))
    assert (r["bytes_ratio"] is None) == (r["cheapest_within_tolerance"] is None)
    md = (tmp_path / "benchmarks" / "reports" / "PAYLOAD_RATE_quick.md").read_text()
    assert "| tinytarget |" in md and "## At equal bytes" in md
    png = tmp_path / "benchmarks" / "reports" / "plots" / "payload_rate_quick_tinytarget.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
