"""Sender and receiver as two library calls; the CLI only parses arguments and prints.

send: target + pool -> teacher -> pool scores -> selection -> `.plada` payload.
receive: payload + pool -> fingerprint check -> labelled pool subset -> student -> accuracy.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from . import backbones, payload, select
from .data import cache_root, load_source
from .errors import PladaError
from .pool import Pool, open_pool
from .score import score_pool
from .student import StudentConfig, train_student
from .teacher import TeacherConfig, train_teacher
from .train import accuracy, predict


def _test_split(target: str, data: str | os.PathLike | None, split: str = "test"):
    src = load_source(target, data)
    return src.split(split) if split in src.splits() else None


def send(
    target: str,
    pool: str | Pool,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    teacher: TeacherConfig | None = None,
    keep: float | None = 0.01,
    count: int | None = None,
    policy: str = "lowest-energy",
    temperature: float = 1.0,
    safety_share: float = 0.0,
    alpha: float = 0.5,
    seed: int = 0,
    train_split: str = "train",
    test_split: str = "test",
    progress: bool = True,
) -> dict:
    """Make a payload for `target` over `pool`; returns a report (teacher accuracy, bytes, class counts)."""
    teacher = teacher or TeacherConfig()
    if temperature <= 0:
        raise PladaError(f"temperature must be positive, got {temperature}")
    out = Path(out)
    if not out.parent.is_dir():
        raise PladaError(f"output folder does not exist: {out.parent}")
    t0 = time.time()
    src = load_source(target, data, progress=progress)
    train = src.split(train_split)
    test = src.split(test_split) if test_split in src.splits() else None
    pool = pool if isinstance(pool, Pool) else open_pool(pool, data)
    k = select.budget(len(pool), keep=keep if count is None else None, count=count)
    select.rank_key(policy, np.zeros(1), np.zeros(1))  # reject an unknown policy before hours of work
    model, tinfo = train_teacher(train, test, teacher, cache_root() / "teachers", progress=progress)
    scores = score_pool(model, pool, cache_root() / "scores", progress=progress)
    labels = scores.labels
    key = select.rank_key(policy, scores.energy(temperature), scores.entropy(), seed=seed)
    idx = select.select(labels, key, k, len(train.class_names), safety_share=safety_share, alpha=alpha)
    meta = {
        "target": src.name,
        "policy": policy,
        "keep": keep if count is None else None,
        "count": k,
        "temperature": temperature,
        "safety_share": safety_share,
        "alpha": alpha,
        "seed": seed,
        "teacher": {"model": teacher.model, "res": teacher.res, "mode": teacher.mode,
                    "test_accuracy": tinfo.get("test_accuracy")},
    }
    p = payload.Payload(pool.fingerprint, len(pool), tuple(train.class_names), idx, labels[idx], meta)
    nbytes = payload.write(out, p)
    return {
        "payload": str(out),
        "payload_bytes": nbytes,
        "kept": int(len(idx)),
        "pool_size": len(pool),
        "teacher_accuracy": tinfo.get("test_accuracy"),
        "kept_per_class": select.class_histogram(labels, idx, len(train.class_names)).tolist(),
        "seconds": round(time.time() - t0, 1),
    }


def receive(
    payload_path: str | os.PathLike,
    pool: str | Pool,
    data: str | os.PathLike | None = None,
    student: StudentConfig | None = None,
    test: str | None = None,
    test_split: str = "test",
    model_out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Rebuild the labelled subset from a payload and our pool, train a student, evaluate it."""
    student = student or StudentConfig()
    t0 = time.time()
    p = payload.read(payload_path)
    if model_out is not None and not Path(model_out).parent.is_dir():
        raise PladaError(f"output folder does not exist: {Path(model_out).parent}")
    pool = pool if isinstance(pool, Pool) else open_pool(pool, data)
    pool.check(p.pool_fingerprint)
    if p.pool_size != len(pool):
        raise PladaError(f"payload is for a pool of {p.pool_size} images, this pool has {len(pool)}")
    testset = None
    if test is not None:
        testset = load_source(test, data, progress=progress).split(test_split)
        if list(testset.class_names) != list(p.class_names):
            raise PladaError(
                f"test split classes {testset.class_names[:5]}… differ from the payload's {list(p.class_names)[:5]}…"
            )
    images = np.asarray(pool.images[p.indices])
    model = train_student(images, p.labels, len(p.class_names), student, progress=progress)
    report = {"kept": int(len(p.indices)), "student": asdict(student), "seconds": 0.0}
    if testset is not None:
        report["student_accuracy"] = accuracy(
            predict(model, testset.images, desc="student eval", progress=progress), testset.labels
        )
    if model_out is not None:
        backbones.save(model, model_out, list(p.class_names), {k: v for k, v in report.items() if k != "seconds"})
        report["model"] = str(model_out)
    report["seconds"] = round(time.time() - t0, 1)
    return report
