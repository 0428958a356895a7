"""The one training loop, shared by teacher and student, and batched prediction.

Data lives in uint8 NHWC arrays (memory-mapped caches or pool slices); a batch is gathered,
augmented (random translation, optional flip) at native resolution, resized to the model's input
resolution and normalised on the fly. AdamW with linear warm-up then cosine decay, as in the paper.
Seeded: the same inputs, seed and thread count give the same weights on the CPU.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbones import Classifier, prepare


def _augment(x: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (reflect padding) and optional horizontal flip."""
    n, h, w, _ = x.shape
    pad = max(1, h // 8)
    xp = F.pad(x.permute(0, 3, 1, 2).float(), (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    out = torch.stack([xp[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if flip:
        m = torch.rand(n, generator=gen) < 0.5
        out[m] = out[m].flip(-1)
    return out.permute(0, 2, 3, 1).round().to(torch.uint8)


def fit(
    model: Classifier,
    images: np.ndarray,
    labels: np.ndarray,
    epochs: float,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.05,
    seed: int = 0,
    augment: bool = True,
    flip: bool = True,
    label_smoothing: float = 0.1,
    freeze_backbone: bool = False,
    desc: str = "train",
    progress: bool = True,
) -> list[float]:
    """Train in place; returns the per-step losses. Fractional epochs are allowed (for big targets)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    n = len(labels)
    if n == 0:
        return []
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = max(1, round(epochs * steps_per_epoch))
    params = model.head.parameters() if freeze_backbone else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    model.train()
    if freeze_backbone:
        model.embed.eval()
    y_all = torch.as_tensor(np.array(labels), dtype=torch.long)
    losses: list[float] = []
    order = np.empty(0, dtype=np.int64)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for _ in range(total):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = np.sort(order[:batch_size]), order[batch_size:]
        xb = torch.from_numpy(np.array(images[idx]))
        if augment:
            xb = _augment(xb, gen, flip)
        x = prepare(xb, model.res)
        if freeze_backbone:
            with torch.no_grad():
                feats = model.embed(x)
            logits = model.head(feats)
        else:
            logits = model(x)
        loss = F.cross_entropy(logits, y_all[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update()
    bar.close()
    model.eval()
    return losses


@torch.inference_mode()
def predict(
    model: Classifier,
    images: np.ndarray,
    batch_size: int = 256,
    desc: str = "predict",
    progress: bool = True,
    features: bool = False,
) -> np.ndarray:
    """Logits (or backbone features) for every image, float32, in input order."""
    model.eval()
    out = []
    for a in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = prepare(torch.from_numpy(np.array(images[a : a + batch_size])), model.res)
        out.append((model.features(x) if features else model(x)).float().numpy())
    if not out:
        return np.zeros((0, model.dim if features else model.head.out_features), dtype=np.float32)
    return np.concatenate(out)


def train_head(
    feats: np.ndarray, labels: np.ndarray, n_classes: int, steps: int = 1000, lr: float = 1e-2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression on fixed features: (weight, bias) acting on raw features.

    A fixed step count (minibatches of 512, AdamW, cosine) keeps the cost flat from 10 to 100k
    examples, which is what lets benchmark grids of hundreds of cells fit on two cores. Every random
    draw comes from generators seeded here (none from torch's global one), so heads trained at once on
    several threads (`train_heads`) come out exactly as when trained one by one.
    """
    f = torch.from_numpy(np.array(feats, dtype=np.float32))
    y = torch.as_tensor(np.array(labels), dtype=torch.long)
    mu, sd = f.mean(0), f.std(0, correction=0) + 1e-6
    fn = (f - mu) / sd
    head = torch.nn.utils.skip_init(torch.nn.Linear, f.shape[1], n_classes)
    with torch.no_grad():  # nn.Linear's own initialisation, drawn from a generator seeded like torch.manual_seed
        init = torch.Generator().manual_seed(seed)
        torch.nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=init)
        bound = 1 / math.sqrt(f.shape[1])
        torch.nn.init.uniform_(head.bias, -bound, bound, generator=init)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(y), (min(512, len(y)),), generator=g)
        loss = F.cross_entropy(head(fn[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():  # fold the feature standardisation into the head
        w = head.weight / sd
        return w.numpy().copy(), (head.bias - (w * mu).sum(1)).numpy().copy()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block on ``n`` torch threads, then restore the old count.

    A proxy head is a tiny matrix product per step; with two threads on a busy two-core machine the
    OpenMP hand-offs cost more than the arithmetic (measured: 14 s vs 1 s for one small search), and
    one thread also makes forecasts reproducible across machines with different core counts.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


HeadJob = tuple[Callable[[], np.ndarray], np.ndarray, int, int, int]  # (features thunk, labels, classes, steps, seed)


def head_job(feats: np.ndarray, rows: np.ndarray, labels: np.ndarray, n_classes: int, steps: int,
             seed: int) -> HeadJob:
    """A `train_heads` job on ``feats[rows]`` (a memory map, say), gathered only when a worker runs it."""
    return (lambda: np.asarray(feats[rows])), labels, n_classes, steps, seed


def train_heads(jobs: Sequence[HeadJob], workers: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """`train_head` for many jobs, ``workers`` at a time, each on one torch thread; results in job order.

    Why threads of one thread each: a head's step is a 512 x 1280 x classes product, too small for two
    cores to share (OpenMP hand-offs cost more than they save), but two heads side by side use both
    (measured: 4 heads in 11.0 s one by one, 5.4 s two at a time). Every head is still computed on one
    thread with its own generators, so the weights do not depend on ``workers``. Features come as
    thunks so that at most ``workers`` gathered feature matrices exist at once.
    """
    workers = max(1, min(len(jobs), workers if workers is not None else (os.cpu_count() or 1)))

    def run(job: HeadJob) -> tuple[np.ndarray, np.ndarray]:
        feats, labels, n_classes, steps, seed = job
        torch.set_num_threads(1)
        return train_head(feats(), labels, n_classes, steps=steps, seed=seed)

    with torch_threads(1):
        if workers == 1:
            return [run(j) for j in jobs]
        with ThreadPoolExecutor(workers) as ex:
            return list(ex.map(run, jobs))


def fit_linear(
    model: Classifier,
    images: np.ndarray,
    labels: np.ndarray,
    steps: int = 1000,
    seed: int = 0,
    progress: bool = True,
    feats: np.ndarray | None = None,
) -> None:
    """Linear probe: backbone features computed once, then only the head is trained on them."""
    if feats is None:
        feats = predict(model, images, desc="features", progress=progress, features=True)
    w, b = train_head(feats, labels, model.head.out_features, steps=steps, seed=seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(w))
        model.head.bias.copy_(torch.from_numpy(b))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(1) == np.asarray(labels)).mean()) if len(labels) else float("nan")
