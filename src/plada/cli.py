"""`plada` command line: parse, call the library, print. User mistakes are one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import PladaError

SIZE_SUFFIX = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2}


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end like every other user mistake: one `plada: error:` line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"plada: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _keep(text: str) -> float:
    """`1%`, `0.01` -> 0.01."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a keep ratio: {text!r} (use e.g. 1% or 0.01)") from None


def _size(text: str) -> int:
    """`20KB`, `1.5MiB`, `4000` -> bytes."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):] or "b"
    try:
        value = float(num) * SIZE_SUFFIX[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 20KB, 1MiB or 4000)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"budget must be at least 1 byte, got {text!r}")
    return int(value)


def _teacher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher")
    g.add_argument("--teacher", default="efficientnet-lite0", help="teacher backbone (registry name)")
    g.add_argument("--teacher-res", type=int, default=64, help="teacher input resolution")
    g.add_argument("--teacher-mode", default="finetune", choices=["finetune", "linear"])
    g.add_argument("--teacher-epochs", type=float, default=2.0)
    g.add_argument("--teacher-limit", type=int, default=None, help="train the teacher on this many target images")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips (e.g. traffic signs)")


def _select_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("selection")
    g.add_argument("--keep", type=_keep, default=0.01, help="share of the pool to keep (1%% or 0.01)")
    g.add_argument("--count", type=int, default=None, help="keep exactly this many images (overrides --keep)")
    g.add_argument("--policy", default="lowest-energy",
                   choices=["lowest-energy", "highest-energy", "lowest-entropy", "random", "auto"],
                   help="auto: proxy students on held-out target images pick policy and size")
    g.add_argument("--budget", type=_size, default=None,
                   help="byte budget, e.g. 20KB: implies --policy auto, picks the keep size too")
    g.add_argument("--temperature", "-T", type=float, default=1.0, help="energy temperature T")
    g.add_argument("--safety-share", type=float, default=0.0, help="Safety-Net share s of the budget (0 = off)")
    g.add_argument("--alpha", type=float, default=0.5, help="Safety-Net exponent: quota ∝ N_c^alpha")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deciders", type=_positive, default=None,  # None: auto.DECIDERS (a test checks)
                   help="auto, when the teacher used all of train: fine-tune this many deciding teachers (default 2), "
                        "each without its own slice of train (--holdout-fraction); the best forecast among their "
                        "own selections is sent")
    g.add_argument("--holdout-fraction", type=_open_fraction, default=None,  # auto.default_holdout_fraction
                   help="auto: the share of train each deciding teacher goes without and decides on (default 0.1, "
                        "0.2 with --holdout-groups, whose groups are near-duplicates)")
    g.add_argument("--holdout-folds", type=_positive, default=None,
                   help="auto: instead of --deciders, cross-fit this many teachers over a K-fold partition of train "
                        "(every train image held out once)")
    g.add_argument("--holdout-groups", metavar="REGEX", default=None,
                   help="auto: hold out train images of one object together; the group is the class plus REGEX's "
                        "first capture group in the file name, e.g. '^(\\d+)_' for GTSRB's TRACK_FRAME.png")
    g.add_argument("--auto-send", default="decider", choices=["teacher", "decider"],  # pipeline.AUTO_SEND
                   help="auto, when the teacher used all of train: send the best deciding teacher's own selection "
                        "and labels, the one its forecast measured (decider), or the full teacher's selection for "
                        "the rule the deciders rank best (teacher)")


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring engine")
    g.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="where the pool is scored: this process, or a Ray actor pool ($RAY_ADDRESS, else local)")
    g.add_argument("--actors", type=_positive, default=None, help="ray: actors (default: one per GPU, else one)")


def _open_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"not a fraction strictly between 0 and 1: {text!r}")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def _student_args(p: argparse.ArgumentParser, epochs: float = 15.0) -> None:
    g = p.add_argument_group("student")
    g.add_argument("--student", default="efficientnet-lite0", help="student backbone (registry name)")
    g.add_argument("--student-res", type=int, default=64)
    g.add_argument("--student-mode", default="finetune", choices=["finetune", "linear", "scratch"])
    g.add_argument("--student-epochs", type=float, default=epochs)


def _teacher_cfg(a: argparse.Namespace):
    from .teacher import TeacherConfig

    return TeacherConfig(model=a.teacher, res=a.teacher_res, mode=a.teacher_mode, epochs=a.teacher_epochs,
                         limit=a.teacher_limit, flip=not a.no_flip, seed=a.seed)


def _student_cfg(a: argparse.Namespace):
    from .student import StudentConfig

    return StudentConfig(model=a.student, res=a.student_res, mode=a.student_mode, epochs=a.student_epochs,
                         flip=not getattr(a, "no_flip", False), seed=a.seed)


def cmd_pool_build(a: argparse.Namespace) -> dict:
    from .pool import build_pool

    pool = build_pool(a.sources, a.data, name=a.name, out=Path(a.out) if a.out else None, manifest=a.manifest,
                      progress=not a.json)
    return {"name": pool.name, "size": len(pool), "fingerprint": pool.fingerprint, "path": str(pool.root),
            "missing": int(pool.missing.sum()), "skipped": pool.skipped}


def cmd_pool_shard(a: argparse.Namespace) -> dict:
    from .shards import open_any, write_shards

    pool = write_shards(open_any(a.pool, a.data, progress=not a.json), a.out, shard_size=a.shard_size,
                        encoding=a.format, progress=not a.json)
    return {"name": pool.name, "size": len(pool), "fingerprint": pool.fingerprint, "path": str(pool.root),
            "shards": len(pool.shards), "shard_size": pool.shard_size, "format": pool.encoding,
            "bytes": sum((pool.root / s.file).stat().st_size for s in pool.shards)}


def cmd_pool_export(a: argparse.Namespace) -> dict:
    from .pool import export_manifest
    from .shards import open_any

    pool = open_any(a.pool, build=False)
    out = export_manifest(pool, a.out)
    return {"name": pool.name, "size": len(pool), "fingerprint": pool.fingerprint, "manifest": str(out)}


def cmd_send(a: argparse.Namespace) -> dict:
    from .pipeline import send

    return send(a.target, a.pool, a.out, data=a.data, teacher=_teacher_cfg(a), keep=a.keep, count=a.count,
                policy=a.policy, temperature=a.temperature, safety_share=a.safety_share, alpha=a.alpha, seed=a.seed,
                progress=not a.json, budget_bytes=a.budget, engine=a.engine, actors=a.actors,
                holdout_folds=a.holdout_folds, deciders=a.deciders, holdout_fraction=a.holdout_fraction,
                holdout_groups=a.holdout_groups, auto_send=a.auto_send)


def cmd_score(a: argparse.Namespace) -> dict:
    from .pipeline import score

    return score(a.pool, a.target, model_path=a.model, out=a.out, data=a.data, teacher=_teacher_cfg(a),
                 engine=a.engine, actors=a.actors, temperature=a.temperature, progress=not a.json)


def cmd_receive(a: argparse.Namespace) -> dict:
    from .pipeline import receive

    return receive(a.payload, a.pool, data=a.data, student=_student_cfg(a), test=a.test, model_out=a.model_out,
                   progress=not a.json, allow_missing=a.allow_missing)


def cmd_inspect(a: argparse.Namespace) -> dict:
    from . import payload

    groups = None
    if a.pool is not None:
        from .shards import open_any

        groups = open_any(a.pool, a.data, progress=False).groups()[0]
    return payload.describe(payload.read_bytes(a.payload), groups=groups)


def cmd_demo(a: argparse.Namespace) -> dict:
    from .pipeline import receive, send

    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pay = out / f"{a.target}.plada"
    s = send(a.target, a.pool, pay, data=a.data, teacher=_teacher_cfg(a), keep=a.keep, count=a.count,
             policy=a.policy, temperature=a.temperature, safety_share=a.safety_share, alpha=a.alpha, seed=a.seed,
             progress=not a.json, budget_bytes=a.budget, holdout_folds=a.holdout_folds,
             deciders=a.deciders, holdout_fraction=a.holdout_fraction, holdout_groups=a.holdout_groups,
             auto_send=a.auto_send)
    r = receive(pay, a.pool, data=a.data, student=_student_cfg(a), test=a.target,
                model_out=out / f"{a.target}-student.safetensors", progress=not a.json)
    return {"target": a.target, "pool_size": s["pool_size"], "kept": s["kept"],
            "teacher_accuracy": s["teacher_accuracy"], "student_accuracy": r["student_accuracy"],
            "payload_bytes": s["payload_bytes"], "payload": str(pay), "send_seconds": s["seconds"],
            "receive_seconds": r["seconds"]}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plada", description="Send a classification dataset as a tiny payload.")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)
    data_help = "folder of dataset archives (default: $PLADA_DATA)"

    pool = sub.add_parser("pool", help="reference pools").add_subparsers(dest="pool_cmd", required=True)
    b = pool.add_parser("build", help="build a pool manifest from sources (NAME or NAME:split,split)")
    b.add_argument("sources", nargs="+")
    b.add_argument("--name", default=None)
    b.add_argument("--out", default=None, help="pool folder (default: the cache)")
    b.add_argument("--data", default=None, help=data_help)
    b.add_argument("--manifest", default=None,
                   help="build in this published manifest's order and fingerprint; absent or differing images "
                        "are marked missing")
    b.set_defaults(func=cmd_pool_build)
    e = pool.add_parser("export", help="write a pool's manifest (path<TAB>hash per image) for receivers")
    e.add_argument("pool", help="pool name or folder")
    e.add_argument("--out", "-o", required=True, help="manifest file to write")
    e.set_defaults(func=cmd_pool_export)
    h = pool.add_parser("shard", help="write a pool as WebDataset-style tar shards (any --pool accepts the folder)")
    h.add_argument("pool", help="pool name or folder (built from its source if needed)")
    h.add_argument("--out", "-o", required=True, help="folder to write (pool-000000.tar, ..., manifest.tsv, pool.json)")
    h.add_argument("--shard-size", type=int, default=10000, help="manifest rows per shard")
    h.add_argument("--format", default="npy", choices=["npy", "png"], help="how each image is stored")
    h.add_argument("--data", default=None, help=data_help)
    h.set_defaults(func=cmd_pool_shard)

    s = sub.add_parser("send", help="target + pool -> .plada payload")
    s.add_argument("target", help="target dataset (name in the data folder, or a path)")
    s.add_argument("--pool", default="tinyimagenet32", help="pool name or folder")
    s.add_argument("--out", "-o", required=True, help="payload file to write")
    s.add_argument("--data", default=None, help=data_help)
    _teacher_args(s)
    _select_args(s)
    _engine_args(s)
    s.set_defaults(func=cmd_send)

    c = sub.add_parser("score", help="score every pool image with the teacher (cached; a later send reuses it)")
    c.add_argument("target", nargs="?", default=None, help="target dataset whose teacher scores the pool")
    c.add_argument("--model", default=None, help="score with this saved model (safetensors) instead of a teacher")
    c.add_argument("--pool", default="tinyimagenet32", help="pool name or folder (sharded or not)")
    c.add_argument("--out", "-o", default=None, help="write logits, labels and energies here (.npz)")
    c.add_argument("--data", default=None, help=data_help)
    c.add_argument("--temperature", "-T", type=float, default=1.0, help="energy temperature T")
    c.add_argument("--seed", type=int, default=0)
    _teacher_args(c)
    _engine_args(c)
    c.set_defaults(func=cmd_score)

    r = sub.add_parser("receive", help=".plada payload + pool -> trained student")
    r.add_argument("payload")
    r.add_argument("--pool", default="tinyimagenet32", help="pool name or folder")
    r.add_argument("--data", default=None, help=data_help)
    r.add_argument("--test", default=None, help="dataset whose test split evaluates the student")
    r.add_argument("--model-out", default=None, help="save the student here (safetensors)")
    r.add_argument("--allow-missing", action="store_true",
                   help="drop kept images this pool lacks (see `pool build --manifest`) instead of refusing")
    r.add_argument("--seed", type=int, default=0)
    _student_args(r)
    r.set_defaults(func=cmd_receive)

    i = sub.add_parser("inspect", help="print a payload's header and section sizes")
    i.add_argument("payload")
    i.add_argument("--pool", default=None, help="the pool (needed for payloads coded by its folders)")
    i.add_argument("--data", default=None, help=data_help)
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="CIFAR-10 target, Tiny-ImageNet pool: send, then receive")
    d.add_argument("--target", default="cifar10")
    d.add_argument("--pool", default="tinyimagenet32")
    d.add_argument("--data", default=None, help=data_help)
    d.add_argument("--out-dir", default="runs/demo")
    _teacher_args(d)
    _select_args(d)
    _student_args(d)
    d.set_defaults(func=cmd_demo, teacher_limit=25000)
    return p


def _print(result: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4f}"
        elif isinstance(v, dict | list):
            v = json.dumps(v)
        print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except PladaError as e:
        print(f"plada: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("plada: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permissions: the environment, not a bug
        print(f"plada: error: {e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": "), file=sys.stderr)
        return 2
    _print(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
