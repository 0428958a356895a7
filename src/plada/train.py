"""The one training loop, shared by teacher and student, and batched prediction.

Data lives in uint8 NHWC arrays (memory-mapped caches or pool slices); a batch is gathered,
augmented (random translation, optional flip) at native resolution, resized to the model's input
resolution and normalised on the fly. AdamW with linear warm-up then cosine decay, as in the paper.
Seeded: the same inputs, seed and thread count give the same weights on the CPU.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .backbones import Classifier, prepare
from .device import amp_dtype, as_device, needs_scaler, placed
from .images import at_size

T = TypeVar("T")

# From this input size up, CPU training batches are laid out channels-last, as the accelerator path's
# always are: at 224 px EfficientNet-Lite0 trains 1.7x faster so (10.5 vs 6.1 img/s on 2 cores, the
# engine benchmark's diagnosis). Below it the layout stays as it was, so every committed 64-px CPU
# figure and the byte-identity tests are unchanged (the layout changes the convolutions' float order).
CPU_CHANNELS_LAST_RES = 128


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


def _random_crops(crops: Callable[[np.ndarray, np.ndarray], np.ndarray], idx: np.ndarray, gen: torch.Generator,
                  flip: bool) -> torch.Tensor:
    """A file-backed batch augmented as ImageNet recipes do: random-resized crops of each full file, then flips.

    ``crops`` is the images' own `LazyImages.crops`; its four draws per image, then the flips, come from
    ``gen`` on this thread, so the batch is the same however its files are decoded.
    """
    draws = torch.rand((len(idx), 4), generator=gen, dtype=torch.float64)
    xb = torch.from_numpy(crops(idx, draws.numpy()))
    if flip:
        m = torch.rand(len(idx), generator=gen) < 0.5
        xb[m] = xb[m].flip(2)
    return xb


def _augment_draws(gen: torch.Generator, shape: torch.Size, flip: bool) -> tuple[int, torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor | None]:
    """`_augment`'s random draws, in its order, from the same generator: (pad, dy, dx, flip mask or None)."""
    n, h = shape[0], shape[1]
    pad = max(1, h // 8)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    m = torch.rand(n, generator=gen) < 0.5 if flip else None
    return pad, dy, dx, m


def _augment_apply(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor,
                   m: torch.Tensor | None) -> torch.Tensor:
    """`_augment` given its draws, as one gather on uint8 wherever ``x`` lives: the same pixels, exactly.

    Why not `_augment` itself on the GPU: its per-image slicing is one kernel launch per image. A
    reflect-padded crop is a pure index map (an image row ``r`` outside ``[0, h)`` reads row ``-r`` or
    ``2(h-1)-r``), and pad, crop and flip only move pixels, so no value changes on any device.
    """
    n, h, w, _ = x.shape

    def taps(offset: torch.Tensor, size: int) -> torch.Tensor:
        r = (offset[:, None] + torch.arange(size, device=x.device)[None] - pad).abs()
        return torch.where(r > size - 1, 2 * (size - 1) - r, r)

    rows, cols = taps(dy, h), taps(dx, w)
    out = x[torch.arange(n, device=x.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if m is not None:
        out = torch.where(m[:, None, None, None], out.flip(2), out)
    return out


def _prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` made on a background thread, up to ``depth`` ahead, in order.

    Why: gathering a batch (memory-map reads, pinning) would otherwise stall the accelerator between
    steps. One producer thread keeps every random draw in the order the CPU path makes it.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised on the consumer's thread
            put((end, e))
            return
        put((end, None))

    t = threading.Thread(target=work, name="plada-prefetch", daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        t.join()


def _optimizer(model: Classifier, lr: float, weight_decay: float, total: int, freeze_backbone: bool,
               fused: bool | None = None):
    """AdamW with linear warm-up over 1/20 of the steps, then cosine decay to zero (``fused``: one CUDA kernel)."""
    params = model.head.parameters() if freeze_backbone else model.parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
    )
    return opt, sched


def _logits(model: Classifier, x: torch.Tensor, freeze_backbone: bool) -> torch.Tensor:
    """A training forward: a frozen backbone runs without a graph, so only the head learns."""
    if freeze_backbone:
        with torch.no_grad():
            feats = model.embed(x)
        return model.head(feats)
    return model(x)


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
    device: torch.device | str | None = None,
) -> list[float]:
    """Train in place; returns the per-step losses. Fractional epochs are allowed (for big targets).

    Augmentation: ``images`` read from files (a `LazyImages`) give random-resized crops of each full file
    (`_random_crops`); an array (a decoded cache, small images) gives translations, as every 64-px figure was made.

    ``device`` None or the CPU is the reference path; an accelerator (`_fit_on`) sees the same batches and
    the same augmentation draws, in mixed precision, and the model comes back to where it was.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    images = at_size(images, model.res)
    n = len(labels)
    if n == 0:
        return []
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = max(1, round(epochs * steps_per_epoch))
    dev = as_device(device)
    if dev.type != "cpu":
        with placed(model, dev):
            return _fit_on(dev, model, images, labels, total, lr, batch_size, weight_decay, rng, gen, augment, flip,
                           label_smoothing, freeze_backbone, desc, progress)
    opt, sched = _optimizer(model, lr, weight_decay, total, freeze_backbone)
    model.train()
    if freeze_backbone:
        model.embed.eval()
    y_all = torch.as_tensor(np.array(labels), dtype=torch.long)
    losses: list[float] = []
    order = np.empty(0, dtype=np.int64)
    crops = getattr(images, "crops", None) if augment else None
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    for _ in range(total):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = np.sort(order[:batch_size]), order[batch_size:]
        if crops is not None:
            xb = _random_crops(crops, idx, gen, flip)
        else:
            xb = torch.from_numpy(np.array(images[idx]))
            if augment:
                xb = _augment(xb, gen, flip)
        x = prepare(xb, model)
        if model.res >= CPU_CHANNELS_LAST_RES:
            x = x.contiguous(memory_format=torch.channels_last)
        logits = _logits(model, x, freeze_backbone)
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


def _fit_on(dev: torch.device, model: Classifier, images: np.ndarray, labels: np.ndarray, total: int, lr: float,
            batch_size: int, weight_decay: float, rng: np.random.Generator, gen: torch.Generator, augment: bool,
            flip: bool, label_smoothing: float, freeze_backbone: bool, desc: str, progress: bool) -> list[float]:
    """`fit`'s loop on an accelerator, the model already there.

    The CPU path's batches and augmentation draws, made one step ahead on a thread and copied from
    pinned memory without blocking; forward and loss under autocast (`device.amp_dtype`), fp16 with a
    GradScaler. Losses stay on the device and are read at the end (and for the bar every 25 steps), so
    the host never waits for a step it does not need.
    """
    n = len(labels)
    amp = amp_dtype(dev)
    scaler = torch.amp.GradScaler(dev.type) if needs_scaler(amp) else None
    cuda = dev.type == "cuda"
    opt, sched = _optimizer(model, lr, weight_decay, total, freeze_backbone, fused=True if cuda else None)
    model.train()
    if freeze_backbone:
        model.embed.eval()
    y_all = torch.as_tensor(np.array(labels), dtype=torch.long).to(dev)

    def pinned(t: torch.Tensor | None) -> torch.Tensor | None:  # a pageable copy would wait for the GPU queue
        return t.pin_memory() if cuda and t is not None else t

    crops = getattr(images, "crops", None) if augment else None

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, tuple | None]]:
        order = np.empty(0, dtype=np.int64)
        for _ in range(total):
            if len(order) < batch_size:
                order = np.concatenate([order, rng.permutation(n)])
            idx, order = np.sort(order[:batch_size]), order[batch_size:]
            draws = None
            if crops is not None:  # cropped and flipped while decoding, on the CPU
                xb = _random_crops(crops, idx, gen, flip)
            else:
                xb = torch.from_numpy(np.array(images[idx]))
            if augment and crops is None:
                pad, dy, dx, m = _augment_draws(gen, xb.shape, flip)
                draws = (pad, pinned(dy), pinned(dx), pinned(m))
            yield pinned(xb), pinned(torch.from_numpy(idx)), draws

    losses: list[torch.Tensor] = []
    bar = tqdm(total=total, desc=desc, unit="step", disable=not progress, leave=False)
    with closing(_prefetched(batches())) as stream:
        for step, (xb, idx, draws) in enumerate(stream):
            x = xb.to(dev, non_blocking=cuda)
            if draws is not None:
                pad, dy, dx, m = draws
                x = _augment_apply(x, pad, dy.to(dev, non_blocking=cuda), dx.to(dev, non_blocking=cuda),
                                   None if m is None else m.to(dev, non_blocking=cuda))
            x = prepare(x, model).contiguous(memory_format=torch.channels_last)
            y = y_all[idx.to(dev, non_blocking=cuda)]
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                logits = _logits(model, x, freeze_backbone)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            losses.append(loss.detach())
            if progress and step % 25 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    model.eval()
    return torch.stack(losses).cpu().tolist() if losses else []


def predict(
    model: Classifier,
    images: np.ndarray,
    batch_size: int = 256,
    desc: str = "predict",
    progress: bool = True,
    features: bool = False,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Logits (or backbone features) for every image, float32, in input order.

    ``device`` None or the CPU is the reference path; on an accelerator the model is borrowed there
    (`device.placed`, outside inference mode so its weights stay trainable) and runs in mixed precision.
    """
    dev = as_device(device)
    images = at_size(images, model.res)
    if dev.type != "cpu":
        with placed(model, dev):
            return _predict_on(dev, model, images, batch_size, desc, progress, features)
    return _predict_cpu(model, images, batch_size, desc, progress, features)


@torch.inference_mode()
def _predict_cpu(model: Classifier, images: np.ndarray, batch_size: int, desc: str, progress: bool,
                 features: bool) -> np.ndarray:
    model.eval()
    out = []
    for a in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        x = prepare(torch.from_numpy(np.array(images[a : a + batch_size])), model)
        out.append((model.features(x) if features else model(x)).float().numpy())
    if not out:
        return np.zeros((0, model.dim if features else model.head.out_features), dtype=np.float32)
    return np.concatenate(out)


@torch.inference_mode()
def _predict_on(dev: torch.device, model: Classifier, images: np.ndarray, batch_size: int, desc: str,
                progress: bool, features: bool) -> np.ndarray:
    """`predict` on an accelerator: the next batch read and pinned on a thread while this one computes.

    Outputs wait on the device and come back 16 batches at a time: one host sync per 16 batches,
    and a bounded device buffer however many images there are.
    """
    model.eval()
    amp = amp_dtype(dev)
    cuda = dev.type == "cuda"

    def batches() -> Iterator[torch.Tensor]:
        for a in range(0, len(images), batch_size):
            xb = torch.from_numpy(np.array(images[a : a + batch_size]))
            yield xb.pin_memory() if cuda else xb

    out: list[np.ndarray] = []
    pending: list[torch.Tensor] = []
    steps = math.ceil(len(images) / batch_size)
    with closing(_prefetched(batches())) as stream:
        for xb in tqdm(stream, total=steps, desc=desc, unit="batch", disable=not progress, leave=False):
            x = prepare(xb.to(dev, non_blocking=cuda), model).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                y = model.features(x) if features else model(x)
            pending.append(y.float())
            if len(pending) == 16:
                out.append(torch.cat(pending).cpu().numpy())
                pending = []
    if pending:
        out.append(torch.cat(pending).cpu().numpy())
    if not out:
        return np.zeros((0, model.dim if features else model.head.out_features), dtype=np.float32)
    return np.concatenate(out)


def train_head(
    feats: np.ndarray, labels: np.ndarray, n_classes: int, steps: int = 1000, lr: float = 1e-2, seed: int = 0,
    device: torch.device | str | None = None, standardise: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression on fixed features: (weight, bias) acting on raw features.

    A fixed step count (minibatches of 512, AdamW, cosine) keeps the cost flat from 10 to 100k
    examples, which is what lets benchmark grids of hundreds of cells fit on two cores. Every random
    draw comes from generators seeded here (none from torch's global one), so heads trained at once on
    several threads (`train_heads`) come out exactly as when trained one by one. On an accelerator
    (``device``) the same draws, still made on the CPU, train the head in float32; on the CPU every
    ``.to(dev)`` below is the identity, so the reference arithmetic is untouched. ``standardise`` False
    trains on the features as given (their scale must already be sane).
    """
    dev = as_device(device)
    f = torch.from_numpy(np.array(feats, dtype=np.float32)).to(dev)
    y = torch.as_tensor(np.array(labels), dtype=torch.long).to(dev)
    if standardise:
        mu, sd = f.mean(0), f.std(0, correction=0) + 1e-6
    else:  # features already on a common scale (plada.head's whitened coordinates): a near-constant one stays small
        mu, sd = torch.zeros(f.shape[1], device=dev), torch.ones(f.shape[1], device=dev)
    fn = (f - mu) / sd
    head = torch.nn.utils.skip_init(torch.nn.Linear, f.shape[1], n_classes)
    with torch.no_grad():  # nn.Linear's own initialisation, drawn from a generator seeded like torch.manual_seed
        init = torch.Generator().manual_seed(seed)
        torch.nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=init)
        bound = 1 / math.sqrt(f.shape[1])
        torch.nn.init.uniform_(head.bias, -bound, bound, generator=init)
    head.to(dev)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(y), (min(512, len(y)),), generator=g).to(dev)
        loss = F.cross_entropy(head(fn[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():  # fold the feature standardisation into the head
        w = head.weight / sd
        return w.cpu().numpy().copy(), (head.bias - (w * mu).sum(1)).cpu().numpy().copy()


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
    device: torch.device | str | None = None,
) -> None:
    """Linear probe: backbone features computed once, then only the head is trained on them."""
    if feats is None:
        feats = predict(model, images, desc="features", progress=progress, features=True, device=device)
    w, b = train_head(feats, labels, model.head.out_features, steps=steps, seed=seed, device=device)
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(w))
        model.head.bias.copy_(torch.from_numpy(b))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((logits.argmax(1) == np.asarray(labels)).mean()) if len(labels) else float("nan")
