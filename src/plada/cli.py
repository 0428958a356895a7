"""`plada` command line: parse, call the library, print. User mistakes are one line, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .config import (
    DEFAULT_POOL,
    ENGINES,
    MAX_SEED,
    POLICIES,
    STUDENT_MODES,
    ReceiveConfig,
    SendConfig,
    apply_sets,
    keys,
    with_seed,
)
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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"not a seed (an integer from 0 to {MAX_SEED}): {text!r}")
    return value


def _sets(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help=f"any other setting (repeatable), e.g. {example}; `plada settings` lists them")
    p.add_argument("--seed", type=_seed, default=None, help="one seed for every random choice (default 0)")


def _device_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--device", default=None, metavar="DEVICE",
                   help="where models train, score and embed: auto (CUDA, else MPS, else CPU; the default), cpu, "
                        "cuda, cuda:N or mps")


def _weights_arg(p: argparse.ArgumentParser | argparse._ArgumentGroup, role: str) -> None:
    p.add_argument("--weights", default=None, metavar="FILE",
                   help=f"the {role}'s pretrained weights from this file (safetensors or a torch state dict), "
                        f"not the hub: for machines offline (= --set {role}.weights=FILE)")


def _send_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sender")
    g.add_argument("--budget", type=_size, default=None,
                   help="payload bytes, e.g. 1KB: sends a head that fits (no teacher); with --set receiver=plain "
                        "labels, the auto policy picking policy and keep size")
    g.add_argument("--keep", type=_keep, default=None, help="share of the pool to keep (default 1%%)")
    g.add_argument("--policy", default=None, choices=POLICIES, help="selection rule (default lowest-energy)")
    g.add_argument("--teacher", default=None, help="teacher backbone: a registry name, timm:NAME or tv:NAME")
    _weights_arg(g, "teacher")
    g.add_argument("--engine", default=None, choices=ENGINES,
                   help="where the pool is scored: this process, or a Ray actor pool ($RAY_ADDRESS, else local)")
    _device_arg(g)


def _settings(cfg, a: argparse.Namespace):
    """`--set` and `--seed` over the flags; the demo's `--set`s are split between its send and receive configs."""
    cfg = apply_sets(cfg, [s for s in a.sets if s.split("=", 1)[0].strip() in keys(cfg)] if a.cmd == "demo"
                     else a.sets)
    return with_seed(cfg, a.seed) if a.seed is not None else cfg


def _native(c, role: str, a: argparse.Namespace):
    """A timm or torchvision `ROLE.model` reads images at its pretrained config's input size unless `--set ROLE.res`
    says otherwise (plada's own models keep the config's 64)."""
    if not str(c.model).startswith(("timm:", "tv:")) or any(
            s.split("=", 1)[0].strip() == f"{role}.res" for s in getattr(a, "sets", [])):
        return c
    from .backbones import native_res  # torch and timm: imported only when such a model is named

    size = native_res(c.model)
    return c if size is None else replace(c, res=size)


def _send_cfg(a: argparse.Namespace, base: SendConfig | None = None) -> SendConfig:
    cfg = base or SendConfig()
    for name in ("budget", "keep", "policy", "engine", "device"):
        if getattr(a, name, None) is not None:
            cfg = replace(cfg, **{name: getattr(a, name)})
    if getattr(a, "teacher", None) is not None:
        cfg = replace(cfg, teacher=replace(cfg.teacher, model=a.teacher))
    if getattr(a, "weights", None) is not None:
        cfg = replace(cfg, teacher=replace(cfg.teacher, weights=a.weights))
    cfg = _settings(cfg, a)
    return replace(cfg, teacher=_native(cfg.teacher, "teacher", a))


def _receive_cfg(a: argparse.Namespace) -> ReceiveConfig:
    cfg = ReceiveConfig(allow_missing=bool(getattr(a, "allow_missing", False)), mode=getattr(a, "receiver", None))
    if getattr(a, "device", None) is not None:
        cfg = replace(cfg, device=a.device)
    if getattr(a, "student", None) is not None:
        cfg = replace(cfg, student=replace(cfg.student, model=a.student))
    if getattr(a, "student_mode", None) is not None:
        cfg = replace(cfg, student=replace(cfg.student, mode=a.student_mode))
    if getattr(a, "weights", None) is not None:
        cfg = replace(cfg, student=replace(cfg.student, weights=a.weights))
    cfg = _settings(cfg, a)
    return replace(cfg, student=_native(cfg.student, "student", a))


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

    return send(a.target, a.pool, a.out, _send_cfg(a).check(), data=a.data, progress=not a.json)


def cmd_score(a: argparse.Namespace) -> dict:
    from .pipeline import score

    cfg = _send_cfg(a, SendConfig())
    return score(a.pool, a.target, cfg, model_path=a.model, out=a.out, data=a.data, progress=not a.json)


def cmd_receive(a: argparse.Namespace) -> dict:
    from .pipeline import receive

    return receive(a.payload, a.pool, _receive_cfg(a).check(), data=a.data, test=a.test, model_out=a.model_out,
                   progress=not a.json)


def cmd_inspect(a: argparse.Namespace) -> dict:
    from . import payload

    groups = None
    if a.pool is not None:
        from .shards import open_any

        groups = open_any(a.pool, a.data, progress=False).groups()[0]
    if a.trust and a.max_images is not None:
        raise PladaError("give --trust or --max-images, not both")
    limit = None if a.trust else (payload.DEFAULT_MAX_IMAGES if a.max_images is None else a.max_images)
    return payload.describe(payload.read_bytes(a.payload), groups=groups, max_images=limit,
                            header_only=a.header_only)


def cmd_settings(a: argparse.Namespace) -> dict:
    """Every `--set` key with its default, per verb: the expert knobs live here, not as flags."""
    def table(cfg) -> dict:
        out = {}
        for k in keys(cfg):
            v = cfg
            for part in k.split("."):
                v = getattr(v, part)
            out[k] = v
        return out

    return {"send": table(SendConfig()), "receive": table(ReceiveConfig()), "demo": {
        "budget": DEMO_BUDGET, "teacher.limit (with --keep)": DEMO_TEACHER_LIMIT}}


# The demo sends a head under this budget (the default payload under a budget, config.BUDGET_RECEIVER): no
# teacher, so it runs in about 7 minutes on 2 cores. With --keep (or a label receiver) it is the paper's
# method, whose teacher trains on DEMO_TEACHER_LIMIT CIFAR-10 images (of 50,000) to stay near 10 minutes.
DEMO_BUDGET = 1000
DEMO_TEACHER_LIMIT = 25000


def cmd_demo(a: argparse.Namespace) -> dict:
    from .pipeline import check_output, receive, send

    unknown = [s for s in a.sets if s.split("=", 1)[0].strip() not in
               set(keys(SendConfig())) | set(keys(ReceiveConfig()))]
    if unknown:
        apply_sets(SendConfig(), unknown)  # raises the one-line error naming the settings there are
    if a.budget is None and a.keep is None:
        a = argparse.Namespace(**{**vars(a), "budget": DEMO_BUDGET})
    scfg = _send_cfg(a)
    if not scfg.sends_head:  # the paper's method: a teacher, trained on part of CIFAR-10 to keep the demo short
        scfg = _send_cfg(a, SendConfig(teacher=replace(SendConfig().teacher, limit=DEMO_TEACHER_LIMIT)))
    scfg, rcfg = scfg.check(), _receive_cfg(a).check()
    out = Path(a.out_dir)
    if out.exists() and not out.is_dir():
        raise PladaError(f"--out-dir is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    pay = check_output(out / f"{a.target}.plada", "payload")
    s = send(a.target, a.pool, pay, scfg, data=a.data, progress=not a.json)
    r = receive(pay, a.pool, rcfg, data=a.data, test=a.target, model_out=out / f"{a.target}-student.safetensors",
                progress=not a.json)
    return {"target": a.target, "pool_size": s["pool_size"], "kept": s["kept"],
            "teacher_accuracy": s["teacher_accuracy"], "student_accuracy": r["student_accuracy"],
            "payload_bytes": s["payload_bytes"], "payload": str(pay), "receiver": s["receiver"],
            "forecast_accuracy": s.get("forecast_accuracy"),
            "receiver_forecasts": s.get("receiver_forecasts"), "trained_on": r["receiver"]["trained_on"],
            "send_seconds": s["seconds"], "receive_seconds": r["seconds"]}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="plada", description="Send a classification dataset as a tiny payload.")
    p.add_argument("--json", action="store_true", help="print one JSON object, no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)
    data_help = "folder of dataset archives (default: $PLADA_DATA)"

    pool = sub.add_parser("pool", help="reference pools").add_subparsers(dest="pool_cmd", required=True)
    b = pool.add_parser("build", help="build a pool manifest from sources (NAME, NAME:split,split, or one folder "
                                      "of image files or WebDataset shards)")
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
    s.add_argument("--pool", default=DEFAULT_POOL, help="pool name or folder")
    s.add_argument("--out", "-o", required=True, help="payload file to write")
    s.add_argument("--data", default=None, help=data_help)
    _send_args(s)
    _sets(s, "teacher.epochs=4 or temperature=0.5")
    s.set_defaults(func=cmd_send)

    c = sub.add_parser("score", help="score every pool image with the teacher (cached; a later send reuses it)")
    c.add_argument("target", nargs="?", default=None, help="target dataset whose teacher scores the pool")
    c.add_argument("--model", default=None, help="score with this saved model (safetensors) instead of a teacher")
    c.add_argument("--pool", default=DEFAULT_POOL, help="pool name or folder (sharded or not)")
    c.add_argument("--out", "-o", default=None, help="write logits, labels and energies here (.npz)")
    c.add_argument("--data", default=None, help=data_help)
    c.add_argument("--teacher", default=None, help="teacher backbone: a registry name, timm:NAME or tv:NAME")
    _weights_arg(c, "teacher")
    c.add_argument("--engine", default=None, choices=ENGINES, help="this process, or a Ray actor pool")
    _device_arg(c)
    _sets(c, "teacher.res=32 or actors=4")
    c.set_defaults(func=cmd_score)

    r = sub.add_parser("receive", help=".plada payload + pool -> trained student")
    r.add_argument("payload")
    r.add_argument("--pool", default=DEFAULT_POOL, help="pool name or folder")
    r.add_argument("--data", default=None, help=data_help)
    r.add_argument("--test", default=None, help="dataset whose test split evaluates the student")
    r.add_argument("--model-out", default=None, help="save the student here (safetensors)")
    r.add_argument("--allow-missing", action="store_true",
                   help="drop kept images this pool lacks (see `pool build --manifest`) instead of refusing")
    r.add_argument("--student", default=None, help="student backbone: a registry name, timm:NAME or tv:NAME")
    _weights_arg(r, "student")
    r.add_argument("--student-mode", default=None, choices=STUDENT_MODES,
                   help="finetune (the paper's), linear (frozen features), scratch (no pretraining); default: "
                        "linear for a head payload, else finetune")
    r.add_argument("--receiver", default=None, choices=ReceiveConfig.MODES,
                   help="plain (the payload's images only), selftrain or propagate (also pseudo-label the pool "
                        "this receiver holds), head (the payload's head labels the pool); default: the mode the "
                        "payload names, else plain")
    _device_arg(r)
    _sets(r, "student.epochs=5 or knn=10")
    r.set_defaults(func=cmd_receive)

    i = sub.add_parser("inspect", help="print a payload's header and section sizes")
    i.add_argument("payload")
    i.add_argument("--pool", default=None, help="the pool (needed for payloads coded by its folders)")
    i.add_argument("--data", default=None, help=data_help)
    i.add_argument("--max-images", type=_positive, default=None, metavar="N",
                   help="decode at most N kept images (default 2,000,000): a small file cannot claim gigabytes")
    i.add_argument("--trust", action="store_true", help="decode whatever the header claims (format limits hold)")
    i.add_argument("--header-only", action="store_true", help="header and section sizes, without decoding")
    i.set_defaults(func=cmd_inspect)

    d = sub.add_parser("demo", help="CIFAR-10 target, Tiny-ImageNet pool: send, then receive")
    d.add_argument("--target", default="cifar10")
    d.add_argument("--pool", default=DEFAULT_POOL)
    d.add_argument("--data", default=None, help=data_help)
    d.add_argument("--out-dir", default="runs/demo")
    d.add_argument("--budget", type=_size, default=None,
                   help=f"payload bytes (default {DEMO_BUDGET}: a head; --set receiver=plain for labels)")
    d.add_argument("--keep", type=_keep, default=None,
                   help="the paper's method instead: keep this share of the pool (e.g. 1%%)")
    _device_arg(d)
    _sets(d, "teacher.epochs=1 or student.mode=linear")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("settings", help="list every --set key and its default")
    t.set_defaults(func=cmd_settings)
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


# Flags of earlier releases: each now a `--set` key, or gone with the mode it belonged to.
MOVED = {"--teacher-res": "--set teacher.res=N", "--teacher-mode": "--set teacher.mode=finetune|linear",
         "--teacher-epochs": "--set teacher.epochs=X", "--teacher-limit": "--set teacher.limit=N",
         "--no-flip": "--set teacher.flip=false (and student.flip=false)", "--count": "--set count=N",
         "--temperature": "--set temperature=X", "-T": "--set temperature=X",
         "--safety-share": "--set safety_share=S", "--alpha": "--set alpha=A", "--deciders": "--set deciders=N",
         "--holdout-fraction": "--set holdout_fraction=F", "--holdout-groups": "--set holdout_groups=REGEX",
         "--actors": "--set actors=N", "--student-res": "--set student.res=N",
         "--student-epochs": "--set student.epochs=X",
         "--holdout-folds": None, "--auto-send": None}  # None: removed with K-fold cross-fitting and teacher-send


def _moved(argv: list[str]) -> str | None:
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in MOVED:
            new = MOVED[flag]
            return (f"{flag} is now {new}" if new else
                    f"{flag} was removed with its auto mode: the auto policy always decides with deciding "
                    "teachers on disjoint slices (--set deciders=N)")
    return None


def _one_line(text: str) -> str:
    """A message naming a path with a line break in it, or quoting a library's multi-line reason, stays one line."""
    return " ".join(part.strip() for part in text.replace("\r", "\n").split("\n") if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    hint = _moved(argv)
    if hint is not None:
        print(f"plada: error: {hint} (see `plada settings`)", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except PladaError as e:
        print(f"plada: error: {_one_line(str(e))}", file=sys.stderr)
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
