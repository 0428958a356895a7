"""The sender's teacher: a pretrained backbone fine-tuned on the labelled target.

Its quality bounds everything downstream (pseudo-labels and energies come from it), so the
default is a full fine-tune; the linear-probe mode (frozen features, trained head) exists for
fast sweeps. A trained teacher is cached by (target data, configuration), so a grid of selection
policies reuses one teacher and one pool scoring. The target data is keyed by the content and label
of every train row (`Split.digest`), so an edited target never gets a stale teacher; a damaged
cache entry is retrained, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

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
