"""What a pool manifest costs in memory: a built pool opened, and a synthetic ImageNet-21K-shaped manifest parsed.

    python scripts/manifest_memory.py [--pool tinyimagenet32] [--lines 2000000]

Python heap measured with tracemalloc (numpy buffers included): held after the call, and the peak during it.
Why: every sender and receiver holds the whole manifest; docs/SCALE.md quotes these figures.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from plada.manifest import Manifest
from plada.pool import open_pool


def heap(fn):
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, held, peak, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default="tinyimagenet32", help="a built pool (name or folder)")
    ap.add_argument("--lines", type=int, default=2_000_000, help="lines of the synthetic manifest")
    a = ap.parse_args()

    def open_it():
        pool = open_pool(a.pool, build=False, progress=False)
        pool.groups()
        return pool

    pool, held, peak, s = heap(open_it)
    n = len(pool)
    print(f"open_pool + groups(), {n} images: held {held / n:.0f} B/image, peak {peak / n:.0f} B/image, {s:.2f} s")
    raw = "".join(f"imagenet21k/train/n{i // 1000:08d}/n{i // 1000:08d}_{i:08d}.JPEG\t{(i * 2654435761) % 2**64:016x}\n"
                  for i in range(a.lines)).encode()
    m, held, peak, s = heap(lambda: Manifest.parse(raw))
    print(f"Manifest.parse, {len(m)} synthetic lines of {len(raw) / len(m):.0f} B: {s:.2f} s; held {held / len(m):.1f} "
          f"B/line beyond the raw bytes, peak {peak / len(m):.0f} B/line beyond them")


if __name__ == "__main__":
    main()
