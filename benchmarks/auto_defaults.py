"""Are the label auto search's defaults right? Judged on validation rows, never on the test split.

    python -m benchmarks.auto_defaults benchmarks/reports/auto_policy_val.json
        # benchmarks/reports/auto_defaults.json and AUTO_DEFAULTS.md

Reads a `python -m benchmarks.auto_policy --eval-split validation` record: per target and byte budget, every
candidate of the default search (each deciding teacher's own selection at each policy and keep size) with
its forecast (proxy head on the decider's held-out slice) and its accuracy on V (the paper's linear student;
V was carved from train and the test split was never read). Each rule below is the default search with one
choice changed, replayed on those recorded forecasts, and scored by the V accuracy of what it would send:

- keep-size ladder: the shares of the largest affordable size tried (default 1, 1/2, 1/4, 1/8);
- deciders: both deciding teachers (default) or one of them alone (its own slice, as recorded);
- ties to more kept images (default) or to fewer; the covering guard (margin 0.01) on or off;
- no search: one decider's lowest energy at the largest size that fits (the paper's rule under a budget);
- the teacher trained on all of train − V sending its own selection (the mode the deciders replaced): the
  paper's rule, and the best of its candidates on V (a ceiling, not a rule).

Replaying is exact for the default (checked: it must pick the candidate the search picked) and for rules
that only drop candidates or change the order, with one approximation: forecasts are the recorded ones, 3-seed
means for the default's finalists and 1-seed otherwise, where a re-run would re-forecast its own finalists.
The proxy's step count and the finalist band change forecasts and are not replayed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from plada import auto

Rule = Callable[[list[dict]], dict | None]  # None: the rule does not apply to this cell


def deciders(rows: list[dict]) -> int:
    return len({r["decider"] for r in rows})


def with_fractions(rows: list[dict]) -> list[dict]:
    """The search's own candidates, each with its share of the largest affordable size of its (decider, policy).

    With deciding teachers the benchmark appends the full teacher's selections (decider None) after the search's
    rows; without (the teacher left part of train unseen: it is the one decider) every row is the search's.
    """
    plain = [dict(r) for r in rows if r.get("receiver", "plain") == "plain"]
    out = [r for r in plain if r.get("decider") is not None] or [{**r, "decider": 0} for r in plain]
    top: dict[tuple, int] = {}
    for r in out:
        key = (r["decider"], r["name"])
        top[key] = max(top.get(key, 0), r["k"])
    for r in out:
        t = top[r["decider"], r["name"]]
        r["fraction"] = next((f for f in auto.DEFAULT_FRACTIONS if max(1, int(t * f)) == r["k"]), r["k"] / t)
    return out


def choose(rows: list[dict], *, more_images: bool = True, margin: float | None = 0.01) -> dict | None:
    """`auto._preference` on recorded forecasts: finalists (the most forecast seeds) first, by best forecast, ties
    by kept images, then bytes; then the rest; a covering candidate within ``margin`` of the first goes first."""
    def rank(r: dict) -> tuple:
        return -r["forecast"], (-r["kept"] if more_images else r["kept"]), r["bytes"]

    if not rows:
        return None
    most = max(r["forecast_seeds"] for r in rows)  # the search's finalists: only they can win while any is left
    order = sorted((r for r in rows if r["forecast_seeds"] == most), key=rank) + sorted(
        (r for r in rows if r["forecast_seeds"] != most), key=rank)
    covering = [r for r in order if r["covers_predicted"]]
    if margin is not None and covering and order[0]["forecast"] - covering[0]["forecast"] <= margin:
        return covering[0]
    return order[0]


DEFAULT = "default: ladder 1, 1/2, 1/4, 1/8; 2 deciders; ties to more images; guard"
CEILING = "hindsight best candidate (not a rule: the ceiling)"


def rules() -> dict[str, Rule]:
    """Name -> rule; the first is the default search."""
    def ladder(shares: tuple[float, ...]) -> Rule:
        return lambda rows: choose([r for r in rows if r["fraction"] in shares])

    def one_decider(d: int) -> Rule:  # only where the search had deciding teachers to choose between
        return lambda rows: choose([r for r in rows if r["decider"] == d]) if deciders(rows) > 1 else None

    def fixed(d: int) -> Rule:
        return lambda rows: max((r for r in rows if r["decider"] == d and r["policy"] == "lowest-energy"
                                 and r["safety_share"] == 0), key=lambda r: r["k"], default=None)

    return {
        DEFAULT: choose,
        "ladder 1 only": ladder((1.0,)),
        "ladder 1, 1/2": ladder((1.0, 0.5)),
        "ladder 1, 1/2, 1/4": ladder((1.0, 0.5, 0.25)),
        "decider 0 alone (one decider)": one_decider(0),
        "decider 1 alone (one decider)": one_decider(1),
        "energy policies only (lowest, highest, Safety-Net)": lambda rows: choose(
            [r for r in rows if r["policy"] in ("lowest-energy", "highest-energy")]),
        "ties to fewer images": lambda rows: choose(rows, more_images=False),
        "no covering guard": lambda rows: choose(rows, margin=None),
        "no search: decider 0, lowest energy, largest size": fixed(0),
        "no search: decider 1, lowest energy, largest size": fixed(1),
        CEILING: lambda rows: max(rows, key=lambda r: r["test_accuracy"]),
    }


# The benchmark's own columns for the teacher trained on all of train − V (no deciders): its selection sent as
# it is, by the paper's rule (lowest energy at the largest size that fits) or the best of its candidates on V.
FULL_TEACHER = {"full teacher, no search: lowest energy, largest size": "default",
                "full teacher's best candidate (hindsight on V, not a rule)": "hindsight"}


def analyse(record: dict) -> dict:
    """Per rule and cell (target, budget), the V accuracy of what it sends, beside the default's on the same cells
    (a rule that does not apply to a cell, e.g. one decider alone where there was one, leaves it out)."""
    cells, table = [], {name: {} for name in [*rules(), *FULL_TEACHER]}
    for target, res in record["targets"].items():
        for budget, cell in sorted(res["budgets"].items(), key=lambda kv: int(kv[0])):
            if "candidates" not in cell:
                continue
            rows = with_fractions(cell["candidates"])
            chosen = next(r for r in rows if r["chosen"])
            replay = choose(rows)
            if (replay["decider"], replay["name"], replay["k"]) != (chosen["decider"], chosen["name"], chosen["k"]):
                raise SystemExit(f"{target} {budget} B: the replay picked {replay['name']} k={replay['k']}, the "
                                 f"search {chosen['name']} k={chosen['k']}: the replay no longer matches auto.search")
            name_ = f"{target} {budget} B"
            cells.append(name_)
            picks = {name: rule(rows) for name, rule in rules().items()}
            picks.update({name: cell.get(key) for name, key in FULL_TEACHER.items()})  # the full teacher's own
            for name, r in picks.items():
                if r is not None:
                    table[name][name_] = {"name": r["name"], "k": r["k"], "decider": r.get("decider"),
                                          "fraction": r.get("fraction"), "val_accuracy": r["test_accuracy"]}
    default, best = table[DEFAULT], table[CEILING]
    summary = {}
    for name, picks in table.items():
        on = list(picks)
        if not on:
            continue
        acc = np.array([picks[c]["val_accuracy"] for c in on])
        dflt = np.array([default[c]["val_accuracy"] for c in on])
        regret = np.array([best[c]["val_accuracy"] for c in on]) - acc
        summary[name] = {
            "cells": len(on),
            "mean_val_accuracy": float(acc.mean()),
            "default_on_these_cells": float(dflt.mean()),
            "mean_regret": float(regret.mean()),
            "within_1pt_of_ceiling": int(np.sum(regret <= 0.01)),
            "vs_default": [int(np.sum(acc > dflt + 1e-9)), int(np.sum(acc < dflt - 1e-9))],
        }
    return {"cells": cells, "summary": summary, "picks": table}


def markdown(res: dict, source: str, command: str) -> str:
    lines = [
        "# Auto search defaults on validation rows",
        "",
        f"`{command}` (from `{source}`; the test split was never read). {len(res['cells'])} cells: "
        + ", ".join(res["cells"]) + ". Accuracy: the paper's linear student on V (the leaders' mean over 3 "
        "seeds, the others seed 0); regret: below the best candidate of the same search. A rule is scored on the "
        "cells it applies to (one decider alone needs two), beside the default on the same cells.",
        "",
        "| rule | cells | mean V accuracy | default, same cells | mean regret (pts) | within 1 pt of the best "
        "| better / worse than default |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['cells']} | {100 * s['mean_val_accuracy']:.2f}% | "
                     f"{100 * s['default_on_these_cells']:.2f}% | {100 * s['mean_regret']:.2f} | "
                     f"{s['within_1pt_of_ceiling']} of {s['cells']} | {s['vs_default'][0]} / {s['vs_default'][1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.auto_defaults", description=__doc__.split("\n\n")[0])
    ap.add_argument("record", type=Path, help="a benchmarks.auto_policy --eval-split validation record (JSON)")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/reports"))
    args = ap.parse_args(argv)
    try:
        record = json.loads(args.record.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.record}: {e}", file=sys.stderr)
        return 2
    if record.get("config", {}).get("eval_split") != "validation":
        print(f"error: {args.record} is not a validation run (--eval-split validation): defaults are not chosen "
              "on the test split", file=sys.stderr)
        return 2
    res = analyse(record)
    command = "python -m benchmarks.auto_defaults " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "auto_defaults.json").write_text(json.dumps({"command": command, "source": str(args.record),
                                                                 **res}, indent=1) + "\n")
    md = markdown(res, str(args.record), command)
    (args.out_dir / "AUTO_DEFAULTS.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
