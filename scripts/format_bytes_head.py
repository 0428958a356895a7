"""Head payloads before and after they joined format 1.0: the same payload written as plada 0.x's "1.1" and as 1.0.

    git archive e6a1989^ src | tar -x -C /tmp/old && python scripts/format_bytes_head.py --old-src /tmp/old/src

Six seeded head payloads (the demo's shape, GTSRB's 43 classes, one with 300 kept images, 200 classes at d=256)
are encoded by the old tree's `plada.payload` and by this one. Why a script and not a test: the old tree is
not part of this one; the test suite checks the new version bytes (tests/test_head.py) and this prints the table
docs/RESULTS.md quotes.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import numpy as np

SHAPES = ((10, 128, 4, 0), (10, 32, 4, 0), (5, 16, 8, 0), (43, 64, 4, 0), (10, 64, 8, 300), (200, 256, 4, 0))


def load(root: str):
    """`plada.payload` from the tree at `root`, with no module of another tree left in sys.modules."""
    for m in [k for k in sys.modules if k == "plada" or k.startswith("plada.")]:
        del sys.modules[m]
    sys.path.insert(0, root)
    try:
        return importlib.import_module("plada.payload")
    finally:
        sys.path.pop(0)


def encode(P, shape: tuple[int, int, int, int], seed: int) -> bytes:
    classes, dim, bits, kept = shape
    rng = np.random.default_rng(seed)
    top = 2 ** (bits - 1) - 1
    head = P.Head("efficientnet-lite0", 64, bits, rng.integers(-top, top + 1, (classes, dim)),
                  rng.uniform(0.01, 0.1, classes), rng.normal(0, 1, classes))
    idx = np.sort(rng.choice(120_000, kept, replace=False))
    return P.encode(P.Payload("ab" * 32, 120_000, tuple(f"class{i}" for i in range(classes)), idx,
                              rng.integers(0, classes, kept), forecast=0.6421, receiver="head", head=head))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old-src", required=True, help="src/ of the tree before e6a1989")
    a = ap.parse_args(argv)
    old = [encode(load(a.old_src), s, i) for i, s in enumerate(SHAPES)]
    new = [encode(load(str(Path(__file__).resolve().parents[1] / "src")), s, i)
           for i, s in enumerate(SHAPES)]
    print("| classes | d | bits | kept | bytes as 1.1 | bytes as 1.0 | the rest identical |")
    print("|---|---|---|---|---|---|---|")
    for s, o, n in zip(SHAPES, old, new, strict=True):
        same = len(o) == len(n) and o[:8] == n[:8] and o[10:-32] == n[10:-32]
        print(f"| {s[0]} | {s[1]} | {s[2]} | {s[3]} | {len(o):,} | {len(n):,} | "
              f"{'yes' if same else 'NO'} (version {o[8:10].hex()} -> {n[8:10].hex()}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
