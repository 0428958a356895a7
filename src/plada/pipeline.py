"""Sender and receiver as library calls, each a few stages with cached artifacts; the CLI only parses and prints.

send: target + pool -> teacher(s) -> pool scores -> candidates -> choice -> `.plada` payload.
receive: payload + pool -> fingerprint check -> labelled pool subset -> student -> accuracy.
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import backbones, engines, payload, rate, select
from .config import ReceiveConfig, SendConfig
from .data import Split, atomic_write, cache_root, open_target, resolve_source
from .device import resolve as resolve_device
from .errors import PladaError
from .images import LazyImages
from .pool import Pool
from .score import chunk_size
from .shards import open_any
from .student import train_student
from .teacher import TeacherConfig, train_teacher
from .train import accuracy, predict

if TYPE_CHECKING:
    import torch

# Fewer unseen train images than this (a teacher on all of train, or nearly): deciding teachers are fine-tuned.
MIN_UNSEEN = 200


def _is_safetensors(head: bytes) -> bool:
    return len(head) > 8 and head[8:9] == b"{"


def check_output(out: str | os.PathLike, what: str, magic: bytes | None = None, ours=None) -> Path:
    """Refuse an output path that cannot be written, or whose file is not one of ours, before any work.

    A FIFO would hang the final write forever and a directory would fail it after hours; an existing file
    that does not start with ``magic`` is someone's data (a dataset, a manifest), never overwritten.
    """
    out = Path(out)
    if "\n" in str(out) or "\r" in str(out):
        raise PladaError(f"{what} path holds a line break: {str(out)!r}")
    if not out.parent.is_dir():
        raise PladaError(f"output folder does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise PladaError(f"output folder is not writable: {out.parent}")
    if out.is_symlink() or out.exists():
        st = os.stat(out) if out.exists() else None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise PladaError(f"{what} path is a directory: {out}")
        if st is None or not stat.S_ISREG(st.st_mode):
            raise PladaError(f"{what} path exists and is not a regular file: {out}")
        if (magic is not None or ours is not None) and st.st_size:
            with open(out, "rb") as f:
                head = f.read(16)
            if not (head.startswith(magic) if magic is not None else ours(head)):
                raise PladaError(f"{what} {out} exists and is not a file plada wrote; refusing to overwrite it")
    return out


def check_not_input(out: Path, inputs: list[Path], what: str) -> None:
    """An output must never be one of the run's own inputs, nor lie inside an input folder or the cache."""
    o = out.resolve()
    for p in inputs:
        try:
            r = Path(p).resolve()
        except OSError:
            continue
        if o == r or (r.is_dir() and r in o.parents):
            raise PladaError(f"{what} {out} would overwrite this run's input {p}")


def _pool_inputs(pool: Pool, data: str | os.PathLike | None) -> list[Path]:
    """The pool's folder, its manifest and the source archives it was built from."""
    found = [pool.root, pool.root / "manifest.tsv"]
    try:
        meta = json.loads((pool.root / "pool.json").read_text())
        for spec in meta.get("sources", []):
            try:
                found.append(resolve_source(str(spec).split(":", 1)[0], data))
            except PladaError:
                pass
    except (OSError, ValueError):
        pass
    return found


def send(
    target: str,
    pool: str | Pool,
    out: str | os.PathLike,
    cfg: SendConfig | None = None,
    *,
    data: str | os.PathLike | None = None,
    progress: bool = True,
    train_split: str = "train",
    test_split: str = "test",
) -> dict:
    """Make a payload for `target` over `pool` (see `SendConfig`); returns a report (teacher accuracy, bytes, ...).

    The auto policy (``cfg.budget`` or ``policy="auto"``) searches policies and keep sizes with proxy
    students on held-out target images and sends the best forecast (`plada.auto`). When the teacher used
    all of train, ``cfg.deciders`` teachers are fine-tuned instead, each without its own slice of train,
    and the best forecast among their own selections is sent with that teacher's labels.
    """
    cfg = (cfg or SendConfig()).check()
    dev = resolve_device(cfg.device)  # an absent accelerator fails now, before any data is read
    chunk_size()  # a bad PLADA_SCORE_CHUNK fails now, not after the teacher
    engines.check_engine(cfg.engine)
    out = check_output(out, "payload", payload.MAGIC)
    record = check_output(report_path(out), "report", ours=_is_report)
    t0 = time.time()
    src = open_target(target, data, progress=progress)
    train = src.split(train_split)
    test = src.split(test_split) if test_split in src.splits() else None
    pool = pool if isinstance(pool, Pool) else open_any(pool, data, progress=progress)
    for o, what in ((out, "payload"), (record, "report")):
        check_not_input(o, [resolve_source(target, data), src.root, cache_root(), *_pool_inputs(pool, data)], what)
    if pool.missing.any():  # its zero rows would be scored, kept and labelled like real images
        raise PladaError(f"pool '{pool.name}' lacks {int(pool.missing.sum())} of its manifest's images; "
                         "a sender needs the complete pool")
    groups = pool.groups()[0]
    if cfg.sends_head and cfg.budget is not None:  # the head alone: no teacher, no labels
        idx, labels = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        encoded, report = _send_head(src.name, train, pool, groups, cfg, idx, labels, progress, dev)
    elif cfg.auto:  # the very bytes the search measured
        idx, labels, encoded, report = _send_auto(src.name, train, test, pool, groups, cfg, progress, dev)
    else:
        idx, labels, report = _send_fixed(src.name, train, test, pool, cfg, progress, dev)
        if cfg.receiver == "head":  # the fixed selection's labels, and a head beside them
            encoded, extra = _send_head(src.name, train, pool, groups, cfg, idx, labels, progress, dev)
            report = {**report, **extra, "selection": {**report["selection"], **extra["selection"]}}
        else:
            mode, forecasts = _fixed_receiver(train, pool, idx, labels, cfg, progress, dev)
            encoded = payload.encode(payload.Payload(pool.fingerprint, len(pool), tuple(train.class_names), idx,
                                                     labels, receiver=mode), groups=groups)
            report = {**report, "receiver": mode, **({"receiver_forecasts": forecasts} if forecasts else {})}
    _check_readable(pool)
    nbytes = payload.write_bytes(out, encoded)
    report = {"payload": str(out), "payload_bytes": nbytes, "report": str(record), "kept": int(len(idx)),
              "pool": pool.name, "pool_size": len(pool), "pool_fingerprint": pool.fingerprint, **report,
              "kept_per_class": np.bincount(labels, minlength=len(train.class_names)).tolist(),
              "device": str(dev), "seconds": round(time.time() - t0, 1)}
    atomic_write(record, json.dumps({"plada": "send report", **report}, indent=1).encode())
    return report


def _check_readable(pool: Pool) -> None:
    """Refuse to send when pool files read as zeros: they were scored as black images and could be kept.

    A folder or shard pool leaves unreadable files out when it is built; one that breaks afterwards (edited,
    truncated, removed) fails its hash check when read, and a receiver would train on other pixels than ours.
    """
    bad = getattr(pool.images, "bad", None)
    if bad is not None and len(bad):
        names = ", ".join(str(pool.paths[int(i)]) for i in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3
                                                                       else "")
        raise PladaError(f"{len(bad)} file(s) of pool '{pool.name}' changed or became unreadable since it was built "
                         f"({names}): restore them, or rebuild the pool and publish its new manifest")


def _is_report(head: bytes) -> bool:
    return head.startswith(b'{\n "plada": ')


def report_path(payload_path: str | os.PathLike) -> Path:
    """The sender's run record beside its payload (`t.plada` -> `t.plada.json`): how the selection was made."""
    p = Path(payload_path)
    return p.with_name(p.name + ".json")


def _selection(name: str, t: TeacherConfig, test_accuracy: float | None, **rule: Any) -> dict:
    return {"target": name, **rule, "teacher": {"model": t.model, "res": t.res, "mode": t.mode,
                                                "test_accuracy": test_accuracy}}


def _send_fixed(name: str, train: Split, test: Split | None, pool: Pool, cfg: SendConfig, progress: bool,
                device: torch.device | None = None):
    """One policy at one keep size: the paper's sender."""
    k = select.budget(len(pool), keep=cfg.keep_share, count=cfg.count)
    safety = 0.0 if cfg.safety_share is None else cfg.safety_share
    alpha = 0.5 if cfg.alpha is None else cfg.alpha
    model, tinfo = train_teacher(train, test, cfg.teacher, cache_root() / "teachers", progress=progress,
                                 device=device)
    scores = engines.score(model, pool, cache_root() / "scores", engine=cfg.engine, progress=progress,
                           actors=cfg.actors, device=device)
    # streamed over the logits a block at a time: memory O(kept + classes), not O(pool) (issue 18)
    idx, kept_labels = scores.select(cfg.policy, k, len(train.class_names), safety_share=safety, alpha=alpha,
                                     T=cfg.temperature, seed=cfg.seed)
    rule = _selection(name, cfg.teacher, tinfo.get("test_accuracy"), policy=cfg.policy, keep=cfg.keep_share,
                      count=k, temperature=cfg.temperature, safety_share=safety, alpha=alpha, seed=cfg.seed)
    trained = tinfo.get("config", {})  # what the teacher was: epochs resolved, mode auto's choice and its scores
    rule["teacher"].update({f: trained[f] for f in ("mode", "epochs") if f in trained},
                           **({"recipe": tinfo["recipe"]} if "recipe" in tinfo else {}))
    return idx, kept_labels, {"teacher_accuracy": tinfo.get("test_accuracy"), "selection": rule}


def _send_auto(name: str, train: Split, test: Split | None, pool: Pool, groups: np.ndarray, cfg: SendConfig,
               progress: bool, device: torch.device | None = None):
    """Stages of the auto sender: deciding teachers and their held-out rows, pool features, search, header."""
    from . import auto
    from .features import rows_features

    seen, unseen, tgroups = unseen_rows(train, cfg.teacher, cfg.holdout_groups)
    own_teacher = len(unseen) >= MIN_UNSEEN  # the sending teacher left enough of train unseen to decide on
    if own_teacher and (cfg.deciders is not None or cfg.holdout_fraction is not None):
        raise PladaError(f"the teacher leaves {len(unseen)} train images unseen (teacher.limit), so it decides "
                         "itself: deciders and holdout_fraction do not act")
    k = None if cfg.budget is not None else select.budget(len(pool), keep=cfg.keep_share, count=cfg.count)
    modes = cfg.receivers
    # sized with the longest mode name, so a chosen mode's shorter header still fits; the choice is re-measured
    size_of = auto.payload_sizer(pool.fingerprint, len(pool), train.class_names, max(modes, key=len), groups=groups)
    # the cheapest payload this target can have: refuse a budget below it before any teacher trains
    if cfg.budget is not None:
        one = size_of(np.array([0]), np.array([0]), 1.0)
        if cfg.budget < one:
            raise PladaError(f"byte budget {cfg.budget} is too small: a payload keeping one image of this target "
                             f"and pool needs about {one} bytes")
    fm, pool_f = _proxy_pool_features(cfg, pool, progress, device)
    key = "/".join((train.dataset, train.split, str(len(train))))

    def feats(idx: np.ndarray, what: str) -> np.ndarray:
        return rows_features(fm, train.images, idx, f"{key}/{what}", progress=progress, device=device)

    def ref_key(idx: np.ndarray) -> np.ndarray:  # nearest-target: compare with images the teacher trained on
        return auto.nearest_target_key(np.asarray(pool_f), feats(auto.subsample(idx, 5000, cfg.seed), "ref"))

    if own_teacher:
        held_idx = auto.subsample(unseen, 5000, cfg.seed)
        model, tinfo = train_teacher(train, test, cfg.teacher, cache_root() / "teachers", progress=progress,
                                     device=device)
        s = engines.score(model, pool, cache_root() / "scores", engine=cfg.engine, progress=progress,
                          actors=cfg.actors, device=device)
        deciders = [auto.Decider(s.labels, s.energy(cfg.temperature), s.entropy(), np.arange(len(held_idx)),
                                 rate.confidence(s.logits), ref_key(seen), tinfo.get("test_accuracy"), fold=None)]
    else:
        n, frac = auto.decider_plan(cfg.deciders, cfg.holdout_fraction)
        held_idx, deciders = decide(train, test, pool, cfg.teacher, n, frac, cfg.seed, ref_key,
                                    temperature=cfg.temperature, engine=cfg.engine, actors=cfg.actors,
                                    progress=progress, groups=tgroups, device=device)

    choice = auto.search(deciders=deciders, pool_feats=pool_f, heldout_feats=feats(held_idx, "held"),
                         heldout_labels=train.labels[held_idx], n_classes=len(train.class_names), size_of=size_of,
                         budget_bytes=cfg.budget, k=k, groups=groups, seed=cfg.seed, receivers=modes,
                         expand=_expander(pool, pool_f, len(train.class_names), cfg.seed, progress))
    sender = deciders[choice.decider]
    encoded = size_of.last  # the search's last measure is its choice, with its forecast in the header
    if len(encoded) != choice.payload_bytes:
        raise AssertionError("the search's last measured payload is not its choice")  # a bug, not a user mistake
    rule = _selection(name, cfg.teacher, sender.test_accuracy, policy=choice.policy, keep=None, count=choice.k,
                      temperature=cfg.temperature, safety_share=choice.safety_share, alpha=choice.alpha,
                      seed=cfg.seed, **({} if choice.tau is None else {"tau": choice.tau}))
    report = {"teacher_accuracy": sender.test_accuracy, "policy": choice.name, "forecast_accuracy": choice.forecast,
              "receiver": choice.receiver, "selection": rule, "auto": choice.summary()}
    return choice.indices, choice.labels, encoded, report


def _send_head(name: str, train: Split, pool: Pool, groups: np.ndarray, cfg: SendConfig, idx: np.ndarray,
               labels: np.ndarray, progress: bool, device: torch.device | None) -> tuple[bytes, dict]:
    """(payload bytes, report) for receiver mode head: a linear head in the pool's PCA space (`plada.head`).

    The head is fitted on target train images with their true labels, over the proxy's public features
    (the default student's backbone, which the header names so the receiver computes the same space).
    Width and precision are chosen on held-out train images: the most accurate that fits ``cfg.budget``.
    Sizes are measured with a four-decimal forecast, the longest a header holds, so the bytes written
    never exceed the bytes measured.
    """
    from . import head as headmod
    from .features import rows_features
    from .receiver import basis_key

    fm, pool_f = _proxy_pool_features(cfg, pool, progress, device)
    rows = train.subset_indices(headmod.TRAIN_LIMIT, cfg.seed)
    key = "/".join((train.dataset, train.split, str(len(train)), "head"))
    train_f = rows_features(fm, train.images, rows, key, progress=progress, device=device)
    pca = headmod.basis(pool_f, basis_key(pool_f))
    classes = tuple(train.class_names)

    def encode(h: payload.Head, forecast: float) -> bytes:
        return payload.encode(payload.Payload(pool.fingerprint, len(pool), classes, idx, labels, forecast=forecast,
                                              receiver="head", head=h), groups=groups)

    if cfg.budget is not None:
        least = len(encode(headmod.quantise(np.zeros((len(classes), 1)), np.zeros(len(classes)), 4, cfg.proxy,
                                            cfg.proxy_res), 0.1234))
        if cfg.budget < least:
            raise PladaError(f"byte budget {cfg.budget} is too small: the smallest head payload for this target and "
                             f"pool needs about {least} bytes (--set receiver=plain sends labels instead)")
    # e.g. GTSRB's frames of one sign: held out together, as test images are new
    tgroups = None if cfg.holdout_groups is None else train_groups(train, cfg.holdout_groups)[rows]
    choice = headmod.choose(train_f, train.labels[rows], len(classes), pca, cfg.proxy, cfg.proxy_res,
                            lambda h: len(encode(h, 0.1234)), cfg.budget, seed=cfg.seed, groups=tgroups)
    encoded = encode(choice.head, choice.forecast)
    h = choice.head
    info = {"backbone": h.backbone, "res": h.res, "dim": h.dim, "bits": h.bits, "train_images": int(len(rows)),
            "holdout_accuracy": choice.forecast, "grid": choice.grid}
    report = {"receiver": "head", "forecast_accuracy": choice.forecast, "head": info,
              "selection": {"target": name, "head": {k: info[k] for k in ("backbone", "res", "dim", "bits")}}}
    if cfg.budget is not None:
        report["teacher_accuracy"] = None
        if len(encoded) * 2 <= cfg.budget:  # the most accurate head leaves most of the budget unused
            report["note"] = (f"the most accurate head needs {len(encoded)} of the {cfg.budget} bytes; a fine-tuned "
                              "student may learn more from labels at this budget (--set receiver=plain; "
                              "docs/RESULTS.md, receiver mode head)")
    return encoded, report


def _proxy_pool_features(cfg: SendConfig, pool: Pool, progress: bool, device: torch.device | None):
    """(feature model, pool features) of the proxy's public backbone: the default student's, so the receiver's."""
    from .features import cached_features, feature_model

    fm = feature_model(cfg.proxy, cfg.proxy_res)
    return fm, cached_features(fm, pool.images, f"pool/{pool.fingerprint}", progress=progress, device=device)


def _expander(pool: Pool, pool_f: np.ndarray, n_classes: int, seed: int, progress: bool):
    """What a receiver of this pool with the proxy's public features makes of a selection (`plada.receiver`):
    the default student's backbone is the proxy's, so this is the receiver's own expansion, not a guess."""
    from . import receiver

    def expand(mode: str, rows: np.ndarray, labels: np.ndarray) -> receiver.Expansion:
        return receiver.expand(mode, pool_f, rows, labels, n_classes, seed=seed, allowed=~pool.missing,
                               progress=progress)
    return expand


def _fixed_receiver(train: Split, pool: Pool, idx: np.ndarray, labels: np.ndarray, cfg: SendConfig,
                    progress: bool, device: torch.device | None) -> tuple[str, dict[str, float] | None]:
    """(mode the header names, each mode's forecast): a fixed selection forecast under each receiver mode.

    Held out: target train images the teacher did not see (`teacher.limit`), else a sample of all of train.
    The teacher's labels fit the latter, which flatters every mode alike: the forecasts rank modes and are
    not sent (the header's forecast stays empty for a fixed policy). Ties go to the first mode, plain.
    """
    from . import auto
    from .features import rows_features

    modes = cfg.receivers
    if len(modes) == 1:
        return modes[0], None
    _, unseen, _ = unseen_rows(train, cfg.teacher, None)
    held = auto.subsample(unseen if len(unseen) >= MIN_UNSEEN else np.arange(len(train)), 5000, cfg.seed)
    fm, pool_f = _proxy_pool_features(cfg, pool, progress, device)
    key = "/".join((train.dataset, train.split, str(len(train)), "held"))
    fc = auto.forecast_modes(pool_feats=pool_f, indices=idx, labels=labels, n_classes=len(train.class_names),
                             heldout_feats=rows_features(fm, train.images, held, key, progress=progress, device=device),
                             heldout_labels=train.labels[held], modes=modes, seed=cfg.seed,
                             expand=_expander(pool, pool_f, len(train.class_names), cfg.seed, progress))
    best = max(modes, key=lambda m: (fc[m], -modes.index(m)))
    return best, fc


def train_groups(train: Split, pattern: str) -> np.ndarray:
    """Group id per train row from its file name (`auto.name_groups`); a split without names is refused."""
    from . import auto

    if train.files is None:
        raise PladaError("holdout_groups needs the train split's file names; this split has none")
    return auto.name_groups(train.files, pattern)


def unseen_rows(train: Split, teacher: TeacherConfig, group_pattern: str | None):
    """(rows the teacher trains on, rows it never sees, group id per row or None) for the auto search."""
    seen = train.subset_indices(teacher.limit, teacher.seed)
    unseen = np.setdiff1d(np.arange(len(train)), seen)
    tgroups = None
    if group_pattern is not None:
        tgroups = train_groups(train, group_pattern)
        unseen = unseen[~np.isin(tgroups[unseen], tgroups[seen])]  # a seen group's other images are not new
    return seen, unseen, tgroups


def decide(
    train: Split, test: Split | None, pool: Pool, teacher: TeacherConfig, n: int, frac: float, seed: int,
    ref_key, held_limit: int = 5000, temperature: float = 1.0, engine: str = "local", actors: int | None = None,
    progress: bool = True, groups: np.ndarray | None = None, device: torch.device | None = None,
) -> tuple[np.ndarray, list]:
    """(held-out train rows, one `auto.Decider` per deciding teacher).

    For a sender whose teacher would use all of train: teacher j is the sender's recipe fitted without its
    own disjoint slice of ``frac`` of train (`auto.fold_split`; ``groups`` keeps each group on one side), and
    decides on at most ``held_limit / n`` of its slice. Each teacher's test accuracy is measured once and
    cached with it: the payload reports the accuracy of the teacher whose labels it carries.
    """
    from . import auto

    per = -(-held_limit // n)
    splits = [(f, auto.subsample(h, per, seed)) for f, h in auto.fold_split(len(train), n, seed, groups, frac=frac)]
    deciders, at = [], 0
    for j, (fit_idx, h) in enumerate(splits):
        tj, info = train_teacher(train.take(fit_idx), test, replace(teacher, limit=None), cache_root() / "teachers",
                                 progress=progress, device=device)
        sj = engines.score(tj, pool, cache_root() / "scores", engine=engine, progress=progress, actors=actors,
                           device=device)
        deciders.append(auto.Decider(sj.labels, sj.energy(temperature), sj.entropy(), np.arange(at, at + len(h)),
                                     rate.confidence(sj.logits), ref_key(fit_idx), info.get("test_accuracy"), fold=j,
                                     train_seconds=info.get("train_seconds")))
        at += len(h)
    return np.concatenate([h for _, h in splits]), deciders


def receive(
    payload_path: str | os.PathLike,
    pool: str | Pool,
    cfg: ReceiveConfig | None = None,
    *,
    data: str | os.PathLike | None = None,
    test: str | None = None,
    test_split: str = "test",
    model_out: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Rebuild the labelled subset from a payload and our pool, train a student, evaluate it.

    Kept images our pool lacks (or holds with other bytes) would be trained on as black squares
    under the sender's label, so they refuse the payload unless ``cfg.allow_missing`` drops them.
    ``cfg.mode`` (else the header's ``receiver``, else plain) decides whether the student also trains on
    pool images the receiver pseudo-labels itself (`plada.receiver`); only the payload, the pool and
    public pretrained weights are used, never the target's data (only ``test`` is read, to evaluate).
    """
    cfg = (cfg or ReceiveConfig()).check()
    dev = resolve_device(cfg.device)
    student = cfg.student
    t0 = time.time()
    if model_out is not None:
        model_out = check_output(model_out, "model", ours=_is_safetensors)
        check_not_input(model_out, [Path(payload_path), cache_root()], "model")
    raw = payload.read_bytes(payload_path)
    # The decoder bounds its memory by the sizes the header claims; checking those claims against
    # our own pool first bounds a receiver by its pool instead (docs/HARDENING.md).
    header = payload.peek_header(raw)
    from . import receiver

    # Before the pool is opened: a header naming a receiver mode this plada lacks is refused in one line.
    mode, mode_from = receiver.resolve_mode(cfg.mode, header["receiver"])
    replace(cfg, mode=mode).check()  # the header's mode: its knobs are checked as if it had been given
    student = student.for_receiver(mode)
    if mode == "head" and "head" not in header:
        raise PladaError(f"receiver mode head needs a payload that carries a head; {payload_path} has none "
                         f"(its sender named {header['receiver']})")
    if header["count"] == 0 and mode != "head":
        raise PladaError(f"{payload_path} keeps no images, only a head: receive it with --receiver head")
    pool = pool if isinstance(pool, Pool) else open_any(pool, data, progress=progress)
    if model_out is not None:
        check_not_input(model_out, _pool_inputs(pool, data), "model")
    pool.check(header["pool_fingerprint"])
    if header["pool_size"] != len(pool):
        raise PladaError(f"payload is for a pool of {header['pool_size']} images, this pool has {len(pool)}")
    try:
        p = payload.decode(raw, groups=pool.groups()[0], max_images=None)  # bounded by our pool, checked above
    except PladaError as e:
        raise PladaError(f"{e} (file {payload_path})") from None
    keep = ~pool.missing[p.indices]
    dropped = int(len(keep) - keep.sum())
    if dropped and not cfg.allow_missing:
        raise PladaError(f"{dropped} of the payload's {len(keep)} kept images are missing or differ in pool "
                         f"'{pool.name}'; pass --allow-missing to train on the other {len(keep) - dropped}")
    if dropped and dropped == len(keep):
        raise PladaError(f"all {len(keep)} kept images are missing from pool '{pool.name}': nothing to train on")
    indices, labels = p.indices[keep], p.labels[keep]
    testset = None
    if test is not None:
        testset = open_target(test, data, progress=progress).split(test_split)
        if list(testset.class_names) != list(p.class_names):
            raise PladaError(
                f"test split classes {testset.class_names[:5]}… differ from the payload's {list(p.class_names)[:5]}…"
            )
    from .features import cached_features, feature_model

    n_cls = len(p.class_names)
    expansion = receiver.Expansion(indices, labels, None, {"mode": "plain", "payload": len(indices), "pseudo": 0})
    feats = None
    student_feats = True  # the features below are the student's own backbone's (a linear student reuses them)
    if mode == "head":  # the head's space is the backbone its header names, whatever the student is
        fm = feature_model(p.head.backbone, p.head.res)
        student_feats = (student.mode == "linear" and student.weights is None
                         and (student.model, student.res) == (p.head.backbone, p.head.res))
        feats = cached_features(fm, pool.images, f"pool/{pool.fingerprint}", progress=progress, device=dev)
        expansion = receiver.expand(mode, feats, indices, labels, n_cls, seed=student.seed, pseudo=cfg.pseudo,
                                    allowed=~pool.missing, progress=progress, head=p.head)
    elif mode != "plain":
        # The receiver's own public weights define the feature space: the student's backbone when it is
        # pretrained, else EfficientNet-Lite0 (a scratch student has no features of its own).
        if student.mode == "scratch":
            fm = feature_model("efficientnet-lite0", 64)
        elif student.weights is not None:  # the student's own local weights file, not the hub's
            fm = backbones.create(student.model, 1, student.res, weights=student.weights).eval()
        else:
            fm = feature_model(student.model, student.res)
        feats = cached_features(fm, pool.images, f"pool/{pool.fingerprint}", progress=progress, device=dev)
        expansion = receiver.expand(mode, feats, indices, labels, n_cls, seed=student.seed, pseudo=cfg.pseudo,
                                    k=cfg.knn, rounds=cfg.rounds, allowed=~pool.missing, progress=progress)
    expansion, train_cfg = receiver.student_recipe(expansion, student, mode, len(indices), len(pool))
    rows, rlabels = expansion.training_rows(student.seed)
    train_cfg = train_cfg.for_rows(len(rows))  # the epochs it trains for, in the report too
    order = np.argsort(rows, kind="stable")
    rows, rlabels = rows[order], rlabels[order]
    if student.mode == "linear" and feats is not None and student_feats:  # cached pool features, not images
        model = train_student(pool.images, rlabels, n_cls, train_cfg, progress=progress, feats=np.asarray(feats[rows]),
                              device=dev)
    else:
        view = pool.images_at(train_cfg.res)  # files stay undecoded (`take`): read and cropped per batch
        kept = view.take(rows) if isinstance(view, LazyImages) else np.asarray(view[rows])
        model = train_student(kept, rlabels, n_cls, train_cfg, progress=progress, device=dev)
    report = {"kept": int(len(indices)), "dropped_missing": dropped, "student": asdict(train_cfg), "seconds": 0.0,
              "receiver": {**expansion.info, "from": mode_from, "trained_on": int(len(rows))}}
    if testset is not None:
        report["student_accuracy"] = accuracy(
            predict(model, testset.images, desc="student eval", progress=progress, device=dev), testset.labels
        )
    if model_out is not None:
        backbones.save(model, model_out, list(p.class_names), {k: v for k, v in report.items() if k != "seconds"})
        report["model"] = str(model_out)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def score(
    pool: str | Pool,
    target: str | None = None,
    cfg: SendConfig | None = None,
    *,
    model_path: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    data: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str = "test",
    progress: bool = True,
) -> dict:
    """Score a pool without selecting anything: the sender's longest step on its own.

    Run it where the compute is (``engine="ray"`` on a cluster) before `send`: the chunks land in the
    same score cache, so a later `send` with the same teacher and pool only selects and writes. The
    teacher is the cached one `send` would train for `target` (``cfg.teacher``), or a saved model
    (``model_path``). ``out`` gets logits, labels and energies in manifest order (`.npz`).
    """
    if (target is None) == (model_path is None):
        raise PladaError("score needs either a target dataset (whose teacher scores the pool) or --model, not both")
    cfg = (cfg or SendConfig()).check()
    dev = resolve_device(cfg.device)
    chunk_size()
    engines.check_engine(cfg.engine)
    if out is not None:
        out = check_output(out, "scores", b"PK")
    t0 = time.time()
    if model_path is not None:
        model, class_names, _ = backbones.load(model_path)
        tinfo: dict = {}
    else:
        src = open_target(target, data, progress=progress)
        train = src.split(train_split)
        test = src.split(test_split) if test_split in src.splits() else None
        model, tinfo = train_teacher(train, test, cfg.teacher, cache_root() / "teachers", progress=progress,
                                     device=dev)
        class_names = train.class_names
    pool = pool if isinstance(pool, Pool) else open_any(pool, data, progress=progress)
    if out is not None:
        check_not_input(out, [cache_root(), *_pool_inputs(pool, data)]
                        + ([Path(model_path)] if model_path is not None else []), "scores")
    t1 = time.time()
    scores = engines.score(model, pool, cache_root() / "scores", engine=cfg.engine, progress=progress,
                           actors=cfg.actors, device=dev)
    seconds = time.time() - t1
    labels, en = scores.labels, scores.energy(cfg.temperature)
    report = {"pool": pool.name, "pool_size": len(pool), "fingerprint": pool.fingerprint, "engine": cfg.engine,
              "device": str(dev),
              "classes": list(class_names), "teacher_accuracy": tinfo.get("test_accuracy"),
              "per_class": np.bincount(labels, minlength=len(class_names)).tolist(),
              "energy": {"min": float(en.min()), "mean": float(en.mean()), "max": float(en.max())} if len(en) else None,
              "score_seconds": round(seconds, 2), "seconds": round(time.time() - t0, 1)}
    if out is not None:
        atomic_write(out, lambda f: np.savez(f, logits=scores.logits, labels=labels, energy=en,
                                             fingerprint=np.array(pool.fingerprint), temperature=cfg.temperature))
        report["scores"] = str(out)
    return report
