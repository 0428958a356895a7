"""Sender and receiver as two library calls; the CLI only parses arguments and prints.

send: target + pool -> teacher -> pool scores -> selection -> `.plada` payload.
receive: payload + pool -> fingerprint check -> labelled pool subset -> student -> accuracy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from . import backbones, engines, payload, rate, select
from .data import Split, atomic_write, cache_root, load_source
from .errors import PladaError
from .pool import Pool
from .score import chunk_size
from .shards import open_any
from .student import StudentConfig, train_student
from .teacher import TeacherConfig, train_teacher
from .train import accuracy, predict

# When the sender's teacher used all of train, auto decides with `auto.DECIDERS` deciding teachers, each without its
# own slice of train, and sends AUTO_SEND's selection: the best deciding teacher's own (see _auto_choice).
AUTO_SEND = "decider"


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
    budget_bytes: int | None = None,
    proxy: str = "efficientnet-lite0",
    proxy_res: int = 64,
    engine: str = "local",
    actors: int | None = None,
    holdout_folds: int | None = None,
    holdout_groups: str | None = None,
    auto_send: str = AUTO_SEND,
    holdout_fraction: float | None = None,
    deciders: int | None = None,
) -> dict:
    """Make a payload for `target` over `pool`; returns a report (teacher accuracy, bytes, class counts).

    `policy="auto"` (implied by `budget_bytes`) searches policies and keep sizes with proxy students
    on held-out target images and sends the best forecast; see `plada.auto`. `holdout_groups` (a regular
    expression on train file names, `auto.name_groups`) holds images of one object out together.
    When the teacher used all of train, `deciders` teachers (default `auto.DECIDERS`) are fine-tuned, each
    without its own disjoint slice of `holdout_fraction` of train (default 0.1, or 0.2 with `holdout_groups`,
    `auto.default_holdout_fraction`); `holdout_folds` K > 1 instead cross-fits K teachers over a partition of
    train (`auto.decider_plan` says which combinations are allowed).
    `auto_send="decider"` (default) sends the best deciding teacher's own selection and labels, the very
    selection its forecast measured (the header's `auto.labels_from_fold` says which; `teacher` there keeps
    the recipe, with that deciding teacher's test accuracy); `"teacher"` sends the full teacher's selection for the rule
    the deciders rank best (`auto.search(send=)`). Both only differ when the teacher used all of train.
    `engine` says where the pool is scored (`plada.engines`); the payload does not depend on it.
    """
    teacher = teacher or TeacherConfig()
    if temperature <= 0:
        raise PladaError(f"temperature must be positive, got {temperature}")
    if holdout_fraction is not None and not (isinstance(holdout_fraction, int | float) and 0 < holdout_fraction < 1):
        raise PladaError(f"holdout_fraction must be a number strictly between 0 and 1, got {holdout_fraction!r}")
    from .auto import decider_plan, name_groups

    # fails now, not after the teacher
    folds, holdout_fraction = decider_plan(holdout_folds, deciders, holdout_fraction, holdout_groups is not None)
    if holdout_groups is not None:
        name_groups([], holdout_groups)  # a bad pattern fails now, not after the teacher
    if auto_send not in ("teacher", "decider"):
        raise PladaError(f"auto_send must be 'teacher' or 'decider', got {auto_send!r}")
    chunk_size()  # a bad PLADA_SCORE_CHUNK fails now, not after the teacher
    engines.check_engine(engine)
    out = Path(out)
    if not out.parent.is_dir():
        raise PladaError(f"output folder does not exist: {out.parent}")
    t0 = time.time()
    src = load_source(target, data, progress=progress)
    train = src.split(train_split)
    test = src.split(test_split) if test_split in src.splits() else None
    pool = pool if isinstance(pool, Pool) else open_any(pool, data, progress=progress)
    if pool.missing.any():  # its zero rows would be scored, kept and labelled like real images
        raise PladaError(f"pool '{pool.name}' lacks {int(pool.missing.sum())} of its manifest's images; "
                         "a sender needs the complete pool")
    if budget_bytes is not None:
        policy = "auto"
    k = select.budget(len(pool), keep=keep if count is None else None, count=count)
    if policy != "auto":
        select.rank_key(policy, np.zeros(1), np.zeros(1))  # reject an unknown policy before hours of work
    if policy == "auto":
        return _send_auto(src, train, test, pool, teacher, out, t0, budget_bytes=budget_bytes,
                          k=None if budget_bytes else k, temperature=temperature, seed=seed, proxy=proxy,
                          proxy_res=proxy_res, progress=progress, engine=engine, actors=actors, folds=folds,
                          group_pattern=holdout_groups, send=auto_send, holdout_fraction=holdout_fraction)
    model, tinfo = train_teacher(train, test, teacher, cache_root() / "teachers", progress=progress)
    scores = engines.score(model, pool, cache_root() / "scores", engine=engine, progress=progress, actors=actors)
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
    nbytes = payload.write(out, p, groups=pool.groups()[0])
    return {
        "payload": str(out),
        "payload_bytes": nbytes,
        "kept": int(len(idx)),
        "pool_size": len(pool),
        "teacher_accuracy": tinfo.get("test_accuracy"),
        "kept_per_class": select.class_histogram(labels, idx, len(train.class_names)).tolist(),
        "seconds": round(time.time() - t0, 1),
    }


def _send_auto(src, train, test, pool, teacher, out, t0, *, budget_bytes, k, temperature, seed, proxy, proxy_res,
               progress, engine, actors, folds, group_pattern, send, holdout_fraction=None) -> dict:
    """`send` for policy auto. When deciding teachers will label the payload (`send="decider"` and a teacher
    that uses all of train), the full teacher would label nothing, so it is neither fine-tuned nor scored:
    the report's teacher accuracy is then the sending decider's."""
    seen, unseen, tgroups = _unseen_rows(train, teacher, group_pattern)
    scores, tinfo = None, {}
    if send == "teacher" or len(unseen) >= MIN_UNSEEN:
        model, tinfo = train_teacher(train, test, teacher, cache_root() / "teachers", progress=progress)
        scores = engines.score(model, pool, cache_root() / "scores", engine=engine, progress=progress, actors=actors)
    teacher_meta = {"model": teacher.model, "res": teacher.res, "mode": teacher.mode,
                    "test_accuracy": tinfo.get("test_accuracy")}
    base = {"target": src.name, "keep": None, "temperature": temperature, "teacher": teacher_meta}
    choice, deciders = _auto_choice(train, test, pool, teacher, scores, base, budget_bytes, k, temperature, seed, proxy,
                                    proxy_res, progress, engine=engine, actors=actors, folds=folds, tgroups=tgroups,
                                    seen=seen, unseen=unseen, send=send, holdout_fraction=holdout_fraction)
    idx, sel_labels, meta = choice.indices, choice.labels, {**base, **choice.meta()}
    p = payload.Payload(pool.fingerprint, len(pool), tuple(train.class_names), idx, sel_labels, meta)
    nbytes = payload.write(out, p, groups=pool.groups()[0])
    acc = tinfo.get("test_accuracy") if choice.decider is None else deciders[choice.decider].test_accuracy
    return {"payload": str(out), "payload_bytes": nbytes, "kept": int(len(idx)), "pool_size": len(pool),
            "teacher_accuracy": acc, "policy": choice.name, "forecast_accuracy": choice.forecast,
            "kept_per_class": np.bincount(sel_labels, minlength=len(train.class_names)).tolist(),
            "auto": choice.summary(), "seconds": round(time.time() - t0, 1)}


# Fewer unseen train images than this (a teacher on all of train, or nearly): deciding teachers are fine-tuned.
MIN_UNSEEN = 200


def _unseen_rows(train: Split, teacher: TeacherConfig, group_pattern: str | None):
    """(rows the teacher trains on, rows it never sees, group id per row or None) for the auto search."""
    from . import auto

    seen = train.subset_indices(teacher.limit, teacher.seed)
    unseen = np.setdiff1d(np.arange(len(train)), seen)
    tgroups = None
    if group_pattern is not None:
        if train.files is None:
            raise PladaError("--holdout-groups needs the train split's file names; this split has none")
        tgroups = auto.name_groups(train.files, group_pattern)
        unseen = unseen[~np.isin(tgroups[unseen], tgroups[seen])]  # a seen group's other images are not new
    return seen, unseen, tgroups


def _auto_choice(train, test, pool, teacher, scores, base_meta, budget_bytes, k, temperature, seed, proxy, proxy_res,
                 progress, *, seen, unseen, folds, tgroups=None, engine="local", actors=None, send=AUTO_SEND,
                 holdout_fraction=None):
    """Pick the policy with proxy students scored on target images the deciding teacher never saw.

    A teacher trained on a subset (`--teacher-limit`) leaves the rest of train unseen: those are the
    held-out images, and nothing is wasted. A teacher that used all of train is cross-fitted: `folds`
    teachers decide, each trained without its own held-out part (`auto.Decider`; `cross_fit`: a slice of
    `holdout_fraction` each, or with none a K-fold partition). `send="decider"` sends a deciding teacher's own
    selection (`auto.search`), and `scores` (the full teacher's) may then be None: the header's teacher test
    accuracy is then the sending decider's (each decider's candidates are sized with its own);
    `"teacher"` sends the full teacher's selection for the best rule.
    `seen`/`unseen`/`tgroups` come from `_unseen_rows`: held-out rows share no group with rows the deciding
    teacher trained on. Returns (choice, deciders or None); `base_meta` is updated to what the payload carries.
    """
    from . import auto
    from .features import cached_features, feature_model, rows_features

    fm = feature_model(proxy, proxy_res)
    pool_f = cached_features(fm, pool.images, f"pool/{pool.fingerprint}", progress=progress)
    key = "/".join((train.dataset, train.split, str(len(train))))

    def feats(idx: np.ndarray, what: str) -> np.ndarray:
        return rows_features(fm, train.images, idx, f"{key}/{what}", progress=progress)

    def ref_key(idx: np.ndarray) -> np.ndarray:  # nearest-target: compare with images the teacher trained on
        return auto.nearest_target_key(np.asarray(pool_f), feats(auto.subsample(idx, 5000, seed), "ref"))

    groups = pool.groups()[0]
    deciders = None
    if len(unseen) >= MIN_UNSEEN:
        held_idx = auto.subsample(unseen, 5000, seed)
        nearest = ref_key(seen)
    else:
        held_idx, deciders, _ = cross_fit(train, pool, teacher, folds, seed, ref_key, temperature=temperature,
                                          engine=engine, actors=actors, progress=progress, groups=tgroups,
                                          test=test if scores is None else None, holdout_fraction=holdout_fraction)
        nearest = ref_key(np.arange(len(train))) if send == "teacher" else None  # deciders carry their own
    held_f = feats(held_idx, "held")

    def header_of(decider: int | None) -> dict:  # without a full teacher, a decider's labels go with its accuracy
        if scores is not None or decider is None:
            return base_meta
        return {**base_meta, "teacher": {**base_meta["teacher"], "test_accuracy": deciders[decider].test_accuracy}}

    sizers = {j: auto.payload_sizer(pool.fingerprint, len(pool), train.class_names, header_of(j), groups=groups)
              for j in (None, *range(len(deciders or ())))}

    def sizer(indices: np.ndarray, labels: np.ndarray, meta: dict) -> int:  # each candidate with its own header
        return sizers[meta.get("auto", {}).get("labels_from_fold")](indices, labels, meta)

    if scores is not None:
        sender = (scores.labels, scores.energy(temperature), scores.entropy(), rate.confidence(scores.logits))
    else:  # decider mode without a full teacher: only the deciders' scores are used (these are checked, not sent)
        d = deciders[0]
        sender = (d.labels, d.energy, d.entropy, d.confidence)
    choice = auto.search(labels=sender[0], energy=sender[1], entropy=sender[2], pool_feats=pool_f,
                         heldout_feats=held_f, heldout_labels=train.labels[held_idx],
                         n_classes=len(train.class_names), size_of=sizer, budget_bytes=budget_bytes, k=k,
                         nearest_key=nearest, groups=groups, confidence=sender[3],
                         deciders=deciders, seed=seed, send=send if deciders else "teacher")
    base_meta.update(header_of(choice.decider))
    return choice, deciders


def cross_fit(
    train: Split, pool: Pool, teacher: TeacherConfig, folds: int, seed: int,
    ref_key: Callable[[np.ndarray], np.ndarray], held_limit: int = 5000, temperature: float = 1.0,
    engine: str = "local", actors: int | None = None,
    progress: bool = True, groups: np.ndarray | None = None, test: Split | None = None,
    holdout_fraction: float | None = None,
) -> tuple[np.ndarray, list, list[float]]:
    """(held-out train rows, one `auto.Decider` per fold, fine-tune seconds per fold teacher).

    For a sending teacher that used all of train: each fold's teacher is the sender's recipe fitted
    without that fold, and decides on at most `held_limit / folds` of the fold's images; `ref_key`
    gives its nearest-target key from the rows it trained on; `groups` keeps each group in one fold.
    With `test`, each fold teacher's test accuracy is measured once (cached with the teacher,
    `Decider.test_accuracy`): a sender that sends a fold teacher's labels reports that teacher.
    `holdout_fraction` is the slice each teacher goes without (`auto.fold_split`; for folds=1 the default is
    `auto.default_holdout_fraction`: 0.1, or 0.2 with `groups`; for more folds none means a partition;
    `auto.decider_plan` turns a user's request into these two).
    """
    from . import auto

    per_fold = -(-held_limit // folds)
    splits = [(f, auto.subsample(h, per_fold, seed))
              for f, h in auto.fold_split(len(train), folds, seed, groups, frac=holdout_fraction)]
    deciders, seconds, at = [], [], 0
    for fit_idx, h in splits:
        tj, info = train_teacher(train.take(fit_idx), test, replace(teacher, limit=None), cache_root() / "teachers",
                                 progress=progress)
        sj = engines.score(tj, pool, cache_root() / "scores", engine=engine, progress=progress, actors=actors)
        deciders.append(auto.Decider(sj.labels, sj.energy(temperature), sj.entropy(), np.arange(at, at + len(h)),
                                     rate.confidence(sj.logits), ref_key(fit_idx), info.get("test_accuracy")))
        seconds.append(info.get("train_seconds"))
        at += len(h)
    return np.concatenate([h for _, h in splits]), deciders, seconds


def receive(
    payload_path: str | os.PathLike,
    pool: str | Pool,
    data: str | os.PathLike | None = None,
    student: StudentConfig | None = None,
    test: str | None = None,
    test_split: str = "test",
    model_out: str | os.PathLike | None = None,
    progress: bool = True,
    allow_missing: bool = False,
) -> dict:
    """Rebuild the labelled subset from a payload and our pool, train a student, evaluate it.

    Kept images our pool lacks (or holds with other bytes) would be trained on as black squares
    under the sender's label, so they refuse the payload unless `allow_missing` drops them.
    """
    student = student or StudentConfig()
    t0 = time.time()
    raw = payload.read_bytes(payload_path)
    # The decoder bounds its memory by the sizes the header claims; checking those claims against
    # our own pool first bounds a receiver by its pool instead (docs/HARDENING.md).
    header = payload.peek_header(raw)
    if model_out is not None and not Path(model_out).parent.is_dir():
        raise PladaError(f"output folder does not exist: {Path(model_out).parent}")
    pool = pool if isinstance(pool, Pool) else open_any(pool, data, progress=progress)
    pool.check(header["pool_fingerprint"])
    if header["pool_size"] != len(pool):
        raise PladaError(f"payload is for a pool of {header['pool_size']} images, this pool has {len(pool)}")
    try:
        p = payload.decode(raw, groups=pool.groups()[0])
    except PladaError as e:
        raise PladaError(f"{e} (file {payload_path})") from None
    keep = ~pool.missing[p.indices]
    dropped = int(len(keep) - keep.sum())
    if dropped and not allow_missing:
        raise PladaError(f"{dropped} of the payload's {len(keep)} kept images are missing or differ in pool "
                         f"'{pool.name}'; pass --allow-missing to train on the other {len(keep) - dropped}")
    if dropped and dropped == len(keep):
        raise PladaError(f"all {len(keep)} kept images are missing from pool '{pool.name}': nothing to train on")
    indices, labels = p.indices[keep], p.labels[keep]
    testset = None
    if test is not None:
        testset = load_source(test, data, progress=progress).split(test_split)
        if list(testset.class_names) != list(p.class_names):
            raise PladaError(
                f"test split classes {testset.class_names[:5]}… differ from the payload's {list(p.class_names)[:5]}…"
            )
    images = np.asarray(pool.images[indices])
    model = train_student(images, labels, len(p.class_names), student, progress=progress)
    report = {"kept": int(len(indices)), "dropped_missing": dropped, "student": asdict(student), "seconds": 0.0}
    if testset is not None:
        report["student_accuracy"] = accuracy(
            predict(model, testset.images, desc="student eval", progress=progress), testset.labels
        )
    if model_out is not None:
        backbones.save(model, model_out, list(p.class_names), {k: v for k, v in report.items() if k != "seconds"})
        report["model"] = str(model_out)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def score(
    pool: str | Pool,
    target: str | None = None,
    model_path: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    teacher: TeacherConfig | None = None,
    engine: str = "local",
    actors: int | None = None,
    temperature: float = 1.0,
    train_split: str = "train",
    test_split: str = "test",
    progress: bool = True,
) -> dict:
    """Score a pool without selecting anything: the sender's longest step on its own.

    Run it where the compute is (`engine="ray"` on a cluster) before `send`: the chunks land in the
    same score cache, so a later `send` with the same teacher and pool only selects and writes. The
    teacher is the cached one `send` would train for `target`, or a saved model (`model_path`).
    `out` gets logits, labels and energies in manifest order (`.npz`).
    """
    if (target is None) == (model_path is None):
        raise PladaError("score needs either a target dataset (whose teacher scores the pool) or --model, not both")
    if temperature <= 0:
        raise PladaError(f"temperature must be positive, got {temperature}")
    chunk_size()
    engines.check_engine(engine)
    if out is not None and not Path(out).parent.is_dir():
        raise PladaError(f"output folder does not exist: {Path(out).parent}")
    t0 = time.time()
    if model_path is not None:
        model, class_names, _ = backbones.load(model_path)
        tinfo: dict = {}
    else:
        src = load_source(target, data, progress=progress)
        train = src.split(train_split)
        test = src.split(test_split) if test_split in src.splits() else None
        model, tinfo = train_teacher(train, test, teacher or TeacherConfig(), cache_root() / "teachers",
                                     progress=progress)
        class_names = train.class_names
    pool = pool if isinstance(pool, Pool) else open_any(pool, data, progress=progress)
    t1 = time.time()
    scores = engines.score(model, pool, cache_root() / "scores", engine=engine, progress=progress, actors=actors)
    seconds = time.time() - t1
    labels, en = scores.labels, scores.energy(temperature)
    report = {"pool": pool.name, "pool_size": len(pool), "fingerprint": pool.fingerprint, "engine": engine,
              "classes": list(class_names), "teacher_accuracy": tinfo.get("test_accuracy"),
              "per_class": np.bincount(labels, minlength=len(class_names)).tolist(),
              "energy": {"min": float(en.min()), "mean": float(en.mean()), "max": float(en.max())} if len(en) else None,
              "score_seconds": round(seconds, 2), "seconds": round(time.time() - t0, 1)}
    if out is not None:
        atomic_write(out, lambda f: np.savez(f, logits=scores.logits, labels=labels, energy=en,
                                             fingerprint=np.array(pool.fingerprint), temperature=temperature))
        report["scores"] = str(out)
    return report
