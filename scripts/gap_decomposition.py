"""Where the auto policy's gap comes from when a deciding teacher's own selection is sent.

`benchmarks.auto_policy` (send="decider") compares the sent selection, labelled by a teacher fine-tuned
without a held-out slice, with the best of the *full* teacher's fixed policies on the test split. The gap
splits exactly into two terms that call for different fixes:

    gap = (auto − best decider candidate)  +  (best decider candidate − hindsight)
          └ choice: the forecast's ranking ┘   └ teacher: what one teacher's labels teach vs another's ┘

The first is what a better forecast (a larger held-out slice, more proxy seeds) can shrink: it is never
positive. The second is fixed before the search starts: which train images the deciding teacher did not see
and its fine-tune's luck; no forecast can see it, since the full teacher has no held-out images. "Best decider
candidate" is the best test accuracy among the search's own candidates (test seeds as the benchmark ran
them: 3 for those near the best, 1 for the rest), so the choice term is a regret against hindsight too.

Reads benchmark result files (no training, a second); without arguments, every decider-mode run made since
payload headers are compressed (the table in docs/AUTO_POLICY.md's discussion):

    python scripts/gap_decomposition.py --out results/gap_decomposition.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

RUNS = ["auto_policy.json", "auto_policy_seed1.json", "auto_policy_holdout10_seed2_gtsrb32.json",
        "auto_policy_holdout20_gtsrb32.json", "auto_policy_holdout20_seed1_gtsrb32.json",
        "auto_policy_holdout20_seed2_gtsrb32.json", "auto_policy_holdout20_flowers5.json",
        "auto_policy_folds2_holdout20_gtsrb32.json", "auto_policy_folds2_holdout20_seed1_gtsrb32.json",
        "auto_policy_folds2_holdout20_seed2_gtsrb32.json", "auto_policy_folds2_holdout10_flowers5.json",
        "auto_policy_folds2_holdout10_seed1_flowers5.json"]


def cells(path: Path) -> list[dict]:
    """One row per (target, budget) where the search sent a deciding teacher's own selection."""
    res = json.loads(path.read_text())
    cfg = res.get("config", {})
    out = []
    for target, t in res["targets"].items():
        budgets = t["budgets"] if isinstance(t["budgets"], list) else list(t["budgets"].values())
        deciders = t.get("folds") or cfg.get("folds", 1)
        for cell in sorted(budgets, key=lambda c: c["auto"]["budget_bytes"]):
            dec = [c for c in cell["candidates"] if c.get("decider") is not None and c.get("test_accuracy") is not None]
            if not dec or cell["auto"].get("decider") is None:
                continue  # the teacher's own unseen images decided, or the full teacher's selection was sent
            best = max(dec, key=lambda c: c["test_accuracy"])
            auto, hind = cell["auto"]["test_accuracy"], cell["hindsight"]["test_accuracy"]
            fc = np.array([c["forecast"] for c in dec])
            te = np.array([c["test_accuracy"] for c in dec])
            rank = np.corrcoef(fc.argsort().argsort(), te.argsort().argsort())[0, 1]
            out.append({
                "file": path.name, "target": target, "budget_bytes": cell["auto"]["budget_bytes"],
                "search_seed": cfg.get("search_seed", 0), "deciders": deciders,
                # share of train behind each forecast (the run's default may depend on the target)
                "holdout_fraction": round(cell["auto"]["heldout_images"] / t["train_images"], 2),
                "heldout_images": cell["auto"]["heldout_images"], "auto": auto, "best_decider": best["test_accuracy"],
                "best_decider_name": best["name"], "hindsight": hind, "gap": auto - hind,
                "choice": auto - best["test_accuracy"], "teacher": best["test_accuracy"] - hind,
                "forecast_test_rank_corr": float(rank), "candidates": len(dec),
            })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", type=Path, help="results/auto_policy*.json from benchmarks.auto_policy "
                    "(default: the runs in RUNS)")
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    a.results = a.results or [Path(__file__).resolve().parents[1] / "results" / f for f in RUNS]
    missing = [str(p) for p in a.results if not p.is_file()]
    if missing:
        print(f"error: no such results file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        rows = [r for p in a.results for r in cells(p)]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        print(f"error: not a benchmarks.auto_policy results file ({type(e).__name__}: {e})", file=sys.stderr)
        return 2
    print("| file | target | budget | held-out | auto | best decider candidate | hindsight | gap | choice | "
          "teacher | rank corr |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['file']} | {r['target']} | {r['budget_bytes']:,} B | {r['heldout_images']} | "
              f"{100 * r['auto']:.1f} | {100 * r['best_decider']:.1f} ({r['best_decider_name']}) | "
              f"{100 * r['hindsight']:.1f} | "
              f"{100 * r['gap']:+.1f} | {100 * r['choice']:+.1f} | {100 * r['teacher']:+.1f} | "
              f"{r['forecast_test_rank_corr']:.2f} |")
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["target"], r["holdout_fraction"], r["deciders"]), []).append(r)
    print("\n| target | held-out share | deciders | cells | within 1 pt | mean gap | mean choice | mean teacher | "
          "sd teacher |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (target, frac, deciders), rs in sorted(by.items()):
        g = np.array([[r["gap"], r["choice"], r["teacher"]] for r in rs]) * 100
        print(f"| {target} | {frac:g} | {deciders} | {len(rs)} | {int((g[:, 0] >= -1).sum())} | "
              f"{g[:, 0].mean():+.2f} | {g[:, 1].mean():+.2f} | {g[:, 2].mean():+.2f} | "
              f"{f'{g[:, 2].std(ddof=1):.2f}' if len(g) > 1 else '–'} |")
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
