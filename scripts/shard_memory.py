"""Python-heap peak of indexing WebDataset shards (issue 18): 200,000 tiny samples in 20 shuffled shards.

    python scripts/shard_memory.py after                         # this checkout
    PYTHONPATH=OLD/src python scripts/shard_memory.py before     # another commit's code, the same shards

Prints one JSON line: samples, MB held after and at peak (tracemalloc), seconds, and a hash of the manifest so
two runs can be checked to agree. The shards are written once to /tmp/shards200k.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path("/tmp/shards200k")
N, PER = 200_000, 10_000


def write_shards() -> None:
    from PIL import Image

    ROOT.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(N)
    jpegs = []
    for _ in range(16):
        b = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(b, "JPEG")
        jpegs.append(b.getvalue())
    for s in range(N // PER):
        with tarfile.open(ROOT / f"shard-{s:04d}.tar", "w") as t:
            for i in order[s * PER:(s + 1) * PER]:
                data = jpegs[i % 16] + i.tobytes()  # distinct bytes per sample
                info = tarfile.TarInfo(f"n{i // 1300:08d}_{i:08d}.jpg")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    (ROOT / ".done").write_text("ok\n")


def main() -> None:
    if not (ROOT / ".done").exists():
        write_shards()
    from plada.images import scan_shards

    tracemalloc.start()
    t = time.time()
    got = scan_shards(ROOT, progress=False)
    held, peak = tracemalloc.get_traced_memory()
    text = b"".join(f"{p}\t{h}\n".encode() for p, h in zip(got.paths, got.hashes, strict=True))
    print(json.dumps({"code": sys.argv[1] if len(sys.argv) > 1 else "this", "samples": len(got.paths),
                      "held_mb": round(held / 2**20, 1), "peak_mb": round(peak / 2**20, 1),
                      "seconds": round(time.time() - t, 1), "manifest_sha256": hashlib.sha256(text).hexdigest()[:16]}))


if __name__ == "__main__":
    main()
