"""Bytes of the same payloads before and after the format freeze: plada 0.x drafts against format 1.0.

    python scripts/format_bytes.py --old-src /tmp/wt_old/src runs/old/*.plada
    # -> benchmarks/reports/format_bytes.json and FORMAT_BYTES.md

Each file is a payload written by plada 0.x (git f58ed68; `--old-src` is that tree's `src/`). Its own code decodes
it (in a subprocess, with the pool's groups), and this tree re-encodes the same selection and labels as 1.0 with
the same groups, carrying over the only header fields 1.0 keeps (the forecast; the receiver mode, plain then). The
sections are byte-identical between the two (same codecs, same encoder), so every difference is the header's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from plada import payload
from plada.shards import open_any

OLD_DECODE = r"""
import json, sys
import numpy as np
from plada import payload
from plada.shards import open_any
pool = open_any(sys.argv[1], None, progress=False)
for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):
    raw = open(src, "rb").read()
    info = payload.describe(raw, groups=pool.groups()[0], max_images=None)
    p = payload.decode(raw, groups=pool.groups()[0], max_images=None)
    np.savez(dst, indices=p.indices, labels=p.labels, info=json.dumps(info), meta=json.dumps(p.meta))
"""


def old_decode(files: list[Path], old_src: Path, pool: str, tmp: Path) -> list[dict]:
    outs = [tmp / f"{i}.npz" for i in range(len(files))]
    env = {**os.environ, "PYTHONPATH": str(old_src)}
    args = [sys.executable, "-c", OLD_DECODE, pool]
    for f, o in zip(files, outs, strict=True):
        args += [str(f), str(o)]
    subprocess.run(args, check=True, env=env)
    got = []
    for o in outs:
        z = np.load(o)
        got.append({"indices": z["indices"], "labels": z["labels"], "info": json.loads(str(z["info"])),
                    "meta": json.loads(str(z["meta"]))})
    return got


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("payloads", nargs="+", type=Path)
    ap.add_argument("--old-src", type=Path, required=True, help="src/ of a plada 0.x checkout")
    ap.add_argument("--pool", default="tinyimagenet32")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/reports"))
    a = ap.parse_args(argv)
    pool = open_any(a.pool, None, progress=False)
    groups = pool.groups()[0]
    with tempfile.TemporaryDirectory() as tmp:
        old = old_decode(a.payloads, a.old_src, a.pool, Path(tmp))
    rows = []
    for f, o in zip(a.payloads, old, strict=True):
        meta, info = o["meta"], o["info"]
        forecast = (meta.get("auto") or {}).get("forecast_accuracy")
        p = payload.Payload(info["pool_fingerprint"], info["pool_size"], tuple(info["class_names"]), o["indices"],
                            o["labels"], forecast=forecast)
        new = payload.encode(p, groups=groups)
        back = payload.decode(new, groups=groups, max_images=None)
        assert np.array_equal(back.indices, o["indices"]) and np.array_equal(back.labels, o["labels"])
        now = payload.describe(new, groups=groups, max_images=None)
        rows.append({
            "payload": f.name, "policy": meta.get("policy"), "count": info["count"],
            "budget": (meta.get("auto") or {}).get("budget_bytes"),
            "before_bytes": info["total_bytes"], "before_header": info["header_bytes"],
            "before_version": info["format_version"],
            "before_sections": sum(s["stored_bytes"] for s in info["sections"]),
            "after_bytes": len(new), "after_header": now["header_bytes"],
            "after_sections": sum(s["stored_bytes"] for s in now["sections"]),
            "codecs": "+".join(s["codec"] for s in now["sections"]),
        })
    out = {"command": "python scripts/format_bytes.py --old-src OLD/src " + " ".join(str(f) for f in a.payloads),
           "old_tree": "f58ed68 (plada 0.x, drafts 1-4)", "pool": a.pool, "rows": rows,
           "grew": sum(r["after_bytes"] > r["before_bytes"] for r in rows)}
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / "format_bytes.json").write_text(json.dumps(out, indent=1) + "\n")
    lines = ["# Format 1.0: the same payloads before and after", "",
             f"`{out['command']}`", "",
             "Before: written by plada 0.x (draft format, header with `meta`); after: the same selection, labels and "
             "groups encoded as 1.0. Sections are byte-identical, so the change is the header's.", "",
             "| payload | policy | kept | budget | before B (v) | after B | header before → after | sections |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['payload']} | {r['policy']} | {r['count']} | {r['budget'] or '-'} | "
                     f"{r['before_bytes']:,} (v{r['before_version']}) | {r['after_bytes']:,} | "
                     f"{r['before_header']} → {r['after_header']} | {r['after_sections']:,} {r['codecs']} |")
    lines += ["", f"Payloads that grew: {out['grew']} of {len(rows)}."]
    (a.out_dir / "FORMAT_BYTES.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if out["grew"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
