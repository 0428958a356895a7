"""What the compressed header (payload format versions 3 and 4) saves on the benchmark's own payloads.

docs/RESULTS.md section 3 was measured with plain JSON headers (format versions 1 and 2). This rebuilds
the same lowest-energy selections from the cached teachers' pool scores (`benchmarks.paper`'s config;
nothing is trained when its caches exist) and encodes each twice as `benchmarks.paper` does (no groups)
and as `plada send` does (the pool's folders as groups): the file now, its stored header, and the file
with the same header left as plain JSON (the file minus the stored header plus the JSON's length, since
the sections are the same bytes either way).

    PYTHONPATH=. PLADA_CACHE=... PLADA_DATA=... python scripts/header_bytes.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.paper import Config, get_pool, target_teacher
from plada import payload, select
from plada.data import cache_root
from plada.score import score_pool


def measure(p: payload.Payload, groups=None) -> dict:
    data = payload.encode(p, groups=groups)
    info = payload.describe(data, groups=groups)
    header = payload.peek_header(data)
    plain = len(payload._dumps(header).encode("utf-8"))
    return {"file": len(data), "format_version": info["format_version"], "header_stored": info["header_bytes"],
            "header_json": plain, "file_plain_header": len(data) - info["header_bytes"] + plain}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default="tinyimagenet32")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="results/header_bytes.json")
    a = ap.parse_args(argv)
    cfg = Config()
    t0 = time.time()
    pool = get_pool(a.pool, a.data)
    gid = pool.groups()[0]
    rows = []
    for target in cfg.targets:
        _, train, _, _, teacher, _ = target_teacher(target, cfg, a.data)
        scores = score_pool(teacher, pool, cache_root() / "scores")
        labels, energy = scores.labels, scores.energy()
        n_cls = len(train.class_names)
        for keep in cfg.keeps:
            key = select.rank_key("lowest-energy", energy)
            idx = select.select(labels, key, select.budget(len(pool), keep=keep), n_cls)
            p = payload.Payload(pool.fingerprint, len(pool), tuple(train.class_names), idx, labels[idx],
                                {"policy": "lowest-energy", "keep": keep, "target": target})
            row = {"target": target, "keep": keep, "kept": int(len(idx)), "classes": n_cls,
                   "paper_encoding": measure(p), "send_encoding": measure(p, gid)}
            rows.append(row)
            e, s = row["paper_encoding"], row["send_encoding"]
            print(f"{target:14s} {keep:>5g} {len(idx):>7,d}  file {e['file']:>7,d} B (plain header "
                  f"{e['file_plain_header']:>7,d}; header {e['header_stored']} vs {e['header_json']} B)  "
                  f"with groups {s['file']:>7,d} B (plain header {s['file_plain_header']:>7,d})")
    out = {"command": "python scripts/header_bytes.py" + "".join(f" {x}" for x in (argv or sys.argv[1:])),
           "pool": a.pool, "pool_size": len(pool), "rows": rows, "seconds": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {a.out} in {out['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
