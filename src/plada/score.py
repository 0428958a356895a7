"""Score every pool image with the teacher: hard pseudo-label, energy and entropy.

Energy E(x) = -T * logsumexp(logits / T): low energy means the teacher finds the image
target-like (Liu et al., 2020), which is what the paper prunes by. Scoring the pool is the sender's
longest step, so logits are written in chunks (atomically, one file per chunk) under a cache keyed
by teacher weights, pool fingerprint and chunk size; a killed run recomputes only the chunks that
are missing or unreadable, and the merged result is identical to an uninterrupted run. Logits are
kept, so energy at another temperature costs nothing.

The chunks are merged, block by block, into one `logits.npy` beside them, which `Scores` holds as a
read-only memmap, and every per-image quantity is computed a block of rows at a time: a million-image
pool's logits are never whole in memory. The chunks stay the source of truth; `logits.json` records
which chunk files (inode, size, mtime) the merge was made from, so a chunk rewritten later (recomputed,
or scored by the other engine) makes the next run merge again instead of serving stale logits.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import data as _data
from . import select as sel
from .backbones import Classifier
from .data import atomic_save_npy, atomic_save_rows, map_rows, write_json_atomic
from .errors import PladaError
from .images import LazyImages
from .pool import Pool
from .train import predict

CHUNK = 8192
MERGED, STAMP = "logits.npy", "logits.json"  # in a score dir, beside the chunks named by first row


def chunk_size() -> int:
    """Images per scoring chunk: `PLADA_SCORE_CHUNK`, else CHUNK. Smaller chunks lose less to a crash."""
    raw = os.environ.get("PLADA_SCORE_CHUNK", "")
    if not raw:
        return CHUNK
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise PladaError(f"PLADA_SCORE_CHUNK must be a positive integer, got {raw!r}")
    return value


def energy(logits: np.ndarray, T: float = 1.0, rows: int | None = None) -> np.ndarray:
    """-T·logsumexp(logits/T), float64, numerically stable; `rows` rows at a time (`data.map_rows`)."""
    return map_rows(lambda z: _energy(z, T), logits, rows)


def entropy(logits: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Shannon entropy (nats) of softmax(logits); `rows` rows at a time (`data.map_rows`)."""
    return map_rows(_entropy, logits, rows)


# Both work in place on one float64 copy of the block (the same operations, so the same bits, as
# `-T * (m + log(exp(z / T - m).sum))` and `-(p * log(clip(p))).sum` written out): a block's temporaries are
# one or two (rows, C) arrays, not four.
def _energy(logits: np.ndarray, T: float) -> np.ndarray:
    z = np.array(logits, dtype=np.float64)
    z /= T
    m = z.max(1, keepdims=True)
    z -= m
    np.exp(z, out=z)
    return -T * (m[:, 0] + np.log(z.sum(1)))


def _entropy(logits: np.ndarray) -> np.ndarray:
    p = np.array(logits, dtype=np.float64)
    p -= p.max(1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(1, keepdims=True)
    plogp = np.clip(p, 1e-300, None)
    np.log(plogp, out=plogp)
    plogp *= p
    return -plogp.sum(1)


def _labels(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(1).astype(np.int64)


@dataclass
class Scores:
    """Per pool image: logits and the quantities selection uses, each computed a block of rows at a time."""

    logits: np.ndarray  # (N, C) float32; from `score_pool`, a read-only memmap of the score dir's logits.npy

    @property
    def labels(self) -> np.ndarray:
        return map_rows(_labels, self.logits)

    def energy(self, T: float = 1.0) -> np.ndarray:
        return energy(self.logits, T)

    def entropy(self) -> np.ndarray:
        return entropy(self.logits)

    def select(self, policy: str, k: int, n_classes: int, safety_share: float = 0.0, alpha: float = 0.5,
               T: float = 1.0, seed: int = 0, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(kept indices, their labels): exactly ``i = select.select(self.labels, select.rank_key(policy,
        self.energy(T), self.entropy(), seed), k, n_classes, ...)`` and ``self.labels[i]``, streamed.

        Labels and keys are made a block of rows at a time (`select.select_blocks`), so nothing N-long is
        held: memory is O(k + classes + one block of logits), not the ~60 B per pool image of the arrays.
        Only the score the policy ranks by is computed (none for ``random``).
        """
        sel.block_keys(policy, seed)  # a bad policy or seed fails before any logits are read
        need = sel.SCORE_OF[policy]
        n, width = self.logits.shape[0], self.logits.shape[1]
        rows = int(rows or max(1, _data.BLOCK_BYTES // (8 * max(width, 1))))  # the blocks `map_rows` uses

        def blocks(with_keys: bool):
            key = sel.block_keys(policy, seed) if with_keys else None  # a fresh random stream per pass
            for a in range(0, n, rows):
                z = self.logits[a : a + rows]
                if key is None:
                    yield _labels(z), None
                    continue
                score = _energy(z, T) if need == "energy" else _entropy(z) if need == "entropy" else len(z)
                yield _labels(z), key(score)

        return sel.select_blocks(blocks, n, k, n_classes, safety_share=safety_share, alpha=alpha)


def model_digest(model: Classifier) -> str:
    """Hash of the weights: the scoring cache must never serve another teacher's logits."""
    h = hashlib.sha256(f"{model.name}:{model.res}".encode())
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_chunk(path: Path, rows: int, classes: int) -> np.ndarray | None:
    """A finished chunk, or None when absent or not what this run would have written (then recompute)."""
    try:
        arr = np.load(path)
    except (OSError, ValueError, EOFError):
        return None
    return arr if arr.dtype == np.float32 and arr.shape == (rows, classes) else None


def score_dir(cache: str | os.PathLike, pool: Pool, model: Classifier, chunk: int) -> Path:
    """Where the chunks of one (pool, teacher, chunk size) live, whichever engine computed them.

    Engines share it on purpose: chunks scored on a cluster (`--engine ray`) are reused by a later
    local `send`, as chunks from another thread count would be.
    """
    suffix = "" if chunk == CHUNK else f"-c{chunk}"  # default size keeps the older caches' folder name
    return Path(cache) / f"{pool.fingerprint[:16]}-{model_digest(model)[:16]}{suffix}"


def chunk_path(d: Path, start: int) -> Path:
    """The chunk file of the rows from `start`: the name every engine and every older cache uses."""
    return d / f"{start:012d}.npy"


def _stamp(d: Path, bounds: list[tuple[int, int]], classes: int) -> dict:
    """What a merge was made from; raises OSError when a chunk or the merge is absent."""
    def ident(p: Path) -> list[int]:
        st = p.stat()
        return [st.st_ino, st.st_size, st.st_mtime_ns]

    return {"shape": [bounds[-1][1], classes], "merged": ident(d / MERGED),
            "chunks": [ident(chunk_path(d, a)) for a, _ in bounds]}


def load_merged(d: Path, bounds: list[tuple[int, int]], classes: int) -> np.memmap | None:
    """The merged logits when they were made from exactly the chunk files now in `d`, else None.

    Only the files' identities are compared (a stat each), not their bytes: reusing a merge costs no read
    of the pool's logits. A merge torn by a crash never got renamed into place, so is never seen here."""
    if not bounds:
        return None
    try:
        if json.loads((d / STAMP).read_text()) != _stamp(d, bounds, classes):
            return None
        arr = np.load(d / MERGED, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # absent, torn, or a chunk gone: merged again
        return None
    return arr if arr.dtype == np.float32 and arr.shape == (bounds[-1][1], classes) else None


def merge_chunks(d: Path, bounds: list[tuple[int, int]], classes: int,
                 chunk_logits: Callable[[int, int], np.ndarray]) -> Scores:
    """Write the chunks, in row order, into `d/logits.npy` (atomically) and hold it as a read-only memmap.

    `chunk_logits(a, b)` gives rows a..b (read from their chunk file, or scored and saved there first), so
    one pass scores what is missing and merges, holding one chunk at a time. A crash mid-merge leaves the
    chunks and no merge; the next run merges again from the chunks, byte for byte the same.
    """
    if not bounds:
        return Scores(np.zeros((0, classes), np.float32))
    atomic_save_rows(d / MERGED, (bounds[-1][1], classes), np.float32, (chunk_logits(a, b) for a, b in bounds))
    write_json_atomic(d / STAMP, _stamp(d, bounds, classes))
    return Scores(np.load(d / MERGED, mmap_mode="r"))


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """Row ranges of the chunks of an `n`-image pool."""
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


def score_pool(
    model: Classifier, pool: Pool, cache: Path, batch_size: int = 256, progress: bool = True,
    chunk: int | None = None, device: torch.device | str | None = None,
) -> Scores:
    """Teacher logits for the whole pool, resumable chunk by chunk from `cache`, as a read-only memmap.

    ``device`` (None: the CPU) is not part of the cache: chunks scored on a GPU resume a CPU run and the
    other way round, as chunks from another thread count would (labels and ranks agree in practice)."""
    chunk = chunk or chunk_size()
    d = score_dir(cache, pool, model, chunk)
    d.mkdir(parents=True, exist_ok=True)
    n, classes = len(pool), model.head.out_features
    bounds = chunk_bounds(n, chunk)
    done = load_merged(d, bounds, classes)
    if done is not None:
        return Scores(done)
    view = pool.images_at(model.res)  # a folder or shard pool: its files decoded at the model's own size
    lazy = view if isinstance(view, LazyImages) else None

    def chunk_logits(a: int, b: int) -> np.ndarray:
        path = chunk_path(d, a)
        logits = load_chunk(path, b - a, classes)
        if logits is None:
            if lazy is None:
                logits = predict(model, pool.images[a:b], batch_size=batch_size, progress=False, device=device)
            else:
                with closing(lazy.stream(a, b, batch_size)) as rows:  # decoding overlaps the forward
                    logits = predict(model, rows, batch_size=batch_size, progress=False, device=device)
            logits = logits.astype(np.float32)
            atomic_save_npy(path, logits)
        bar.update(b - a)
        return logits

    with tqdm(total=n, desc="scoring pool", unit="img", disable=not progress) as bar:
        scores = merge_chunks(d, bounds, classes, chunk_logits)
    if lazy is not None:
        lazy.warn_bad()  # the files that read as zeros, named once for the whole pool
    return scores
