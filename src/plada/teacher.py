"""The sender's teacher: a pretrained backbone fine-tuned on the labelled target.

Its quality bounds everything downstream (pseudo-labels and energies come from it), so the default is a full
fine-tune, for a fixed number of images seen rather than epochs (`TeacherConfig.for_train`); mode linear is a
linear probe (frozen features, trained head), and mode auto picks between the two on held-out train rows of
the target itself. A trained teacher is cached by (target data, configuration), so a grid of selection
policies reuses one teacher and one pool scoring. The target data is keyed by the content and label of every
train row (`Split.digest`), so an edited target never gets a stale teacher; a damaged cache entry is
retrained, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import backbones
from .config import TEACHER_MODES, TeacherConfig
from .data import Split, write_json_atomic
from .errors import PladaError
from .train import accuracy, fit, fit_linear, predict

MODES = TEACHER_MODES


def train_teacher(
    train: Split, test: Split | None, cfg: TeacherConfig, cache: Path, progress: bool = True,
    device: torch.device | str | None = None,
) -> tuple[backbones.Classifier, dict]:
    """Fine-tune (or linear-probe) a teacher, or load the cached one; info has its test accuracy.

    A cached teacher first trained without a test split gets its test accuracy measured once and stored.
    ``device`` is where it trains and is measured (None: the CPU); it is not part of the cache key, so a
    teacher trained on a GPU serves a later CPU run of the same configuration, and the other way round."""
    if cfg.mode not in MODES:
        raise PladaError(f"unknown teacher mode '{cfg.mode}' (have: {', '.join(MODES)})")
    if cfg.mode == "auto":
        return _train_chosen(train, test, cfg, cache, progress, device)
    cfg = cfg.for_train(min(len(train), cfg.limit or len(train)))  # keyed by the epochs it trains for
    key = hashlib.sha256(
        json.dumps([_key_config(cfg), train.dataset, train.split, train.class_names, train.digest()],
                   sort_keys=True).encode()
    ).hexdigest()[:16]
    d = Path(cache) / f"{train.dataset}-{key}"
    wpath, ipath = d / "teacher.safetensors", d / "teacher.json"
    cached = _load_cached(wpath, ipath, train.class_names)
    if cached is not None:
        model, info = cached
        if test is not None and "test_accuracy" not in info:
            info["test_accuracy"] = _test_accuracy(model, train, test, progress, device)
            write_json_atomic(ipath, info)
        return model, info
    d.mkdir(parents=True, exist_ok=True)
    sub = train.subset(cfg.limit, cfg.seed)
    torch.manual_seed(cfg.seed)  # the fresh head's init must be seeded too
    model = backbones.create(cfg.model, len(train.class_names), cfg.res, weights=cfg.weights)
    t0 = time.time()
    if cfg.mode == "finetune":
        fit(model, sub.images, sub.labels, cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
            flip=cfg.flip, desc="teacher fine-tune", progress=progress, device=device)
    else:
        fit_linear(model, sub.images, sub.labels, seed=cfg.seed, progress=progress, device=device)
    info = {"config": asdict(cfg), "train_images": len(sub), "train_seconds": round(time.time() - t0, 1)}
    if test is not None:
        info["test_accuracy"] = _test_accuracy(model, train, test, progress, device)
    backbones.save(model, wpath, train.class_names, info)
    write_json_atomic(ipath, info)
    return model, info


def _train_chosen(train: Split, test: Split | None, cfg: TeacherConfig, cache: Path, progress: bool,
                  device: torch.device | str | None) -> tuple[backbones.Classifier, dict]:
    """mode auto: fine-tune or linear probe, whichever labels held-out train rows better, then trained on all.

    Why: the better recipe depends on the target (a linear probe beat a short fine-tune by 12 points on a
    101-class target of 5,784 images, issue 17; fine-tuning won on every shared target,
    benchmarks/reports/teacher_recipe.md), and only the target's own train rows may decide. Both candidates
    train on the same 80% (`head.holdout_mask`, seeded) and are cached like any teacher; a tie keeps the
    paper's fine-tune. The winner is then the cached teacher of its own recipe on all of train.
    """
    from .head import holdout_mask

    part = train.subset(cfg.limit, cfg.seed)
    held = holdout_mask(len(part), cfg.seed)
    fit_split, rows = part.take(np.flatnonzero(~held)), np.flatnonzero(held)
    val_x, val_y = np.asarray(part.images[rows]), part.labels[rows]
    scores = {}
    for mode in ("finetune", "linear"):
        m, _ = train_teacher(fit_split, None, replace(cfg, mode=mode, limit=None), cache, progress, device)
        scores[mode] = accuracy(predict(m, val_x, desc=f"teacher {mode} on held-out", progress=progress,
                                        device=device), val_y)
    chosen = "linear" if scores["linear"] > scores["finetune"] else "finetune"
    model, info = train_teacher(train, test, replace(cfg, mode=chosen), cache, progress, device)
    return model, {**info, "recipe": {"chosen": chosen, "held_out": int(len(rows)), "validation": scores}}


def _key_config(cfg: TeacherConfig) -> dict:
    """The configuration as the cache key sees it: a weights file by its content, not its path.

    Why: another file under the same path must never be served the old teacher, and the same file
    moved must still hit. Without a weights file the key is exactly that of earlier releases.
    """
    conf = asdict(cfg)
    path = conf.pop("weights")
    if path is not None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        conf["weights_sha256"] = h.hexdigest()
    return conf


def _load_cached(wpath: Path, ipath: Path, class_names: list[str]) -> tuple[backbones.Classifier, dict] | None:
    """A cached teacher, or None when absent or damaged (torn write, garbage): then it is trained again.

    Why not an error: the entry is ours, not the user's, and retraining is the only repair anyway.
    """
    if not (wpath.is_file() and ipath.is_file()):
        return None
    try:
        info = json.loads(ipath.read_bytes())
        model, names, _ = backbones.load(wpath)
    except (PladaError, OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None
    if not isinstance(info, dict) or names != list(class_names):
        return None
    return model, info


def _test_accuracy(model: backbones.Classifier, train: Split, test: Split, progress: bool,
                   device: torch.device | str | None = None) -> float:
    if test.class_names != train.class_names:
        raise PladaError("target train and test splits have different class folders")
    return accuracy(predict(model, test.images, desc="teacher eval", progress=progress, device=device), test.labels)
