"""One configuration per verb, defined once: the CLI, the pipeline, the demo and the benchmarks all build these.

Defaults live here and nowhere else. The command line exposes the few options every user needs as
flags; every other field is reachable as ``--set key=value`` (``teacher.epochs=4``, ``temperature=0.5``),
parsed by the field's own type, so an expert knob never becomes a flag threaded through the library.
``check()`` refuses, before any work starts, every value out of range and every option that would not
act in the chosen mode: a silently ignored option is a wrong result the user never sees.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, replace
from typing import Any

from .device import check as _device
from .errors import PladaError
from .payload import LABEL_RECEIVERS, RECEIVERS

DEFAULT_POOL = "tinyimagenet32"  # the pool every verb uses unless --pool names another
POLICIES = ("lowest-energy", "highest-energy", "lowest-entropy", "random", "auto")
ENGINES = ("local", "ray")
DEFAULT_KEEP = 0.01  # the paper's 1%
# The receiver mode a label payload names when none is asked for: plain. receiver="auto" forecasts every label
# mode with the linear proxy and names the best, but on the demo's payload that forecast chose selftrain (+1.5
# points forecast) where the fine-tuned student lost 2.1 points to plain (docs/RESULTS.md, "Receivers that use
# the whole pool"): the proxy does not yet predict the fine-tuned student's mode, so it is not the default.
DEFAULT_RECEIVERS = ("plain",)
# Under a byte budget the default payload is a head (receiver mode head, plada.head), not labels: on held-out
# target train images it beat the best label mode in 19 of 19 (target, budget) cells from 0.5 to 20 KB on the
# four shared targets, by 3.5 to 62.6 points (results/receiver.json "default_on_validation"; docs/RESULTS.md,
# "Defaults"). --set receiver=plain sends the paper's labels under a budget.
BUDGET_RECEIVER = "head"
HEAD_STUDENT = "linear"  # the student a head payload gets unless told (student_mode)
MAX_SEED = 2**32 - 1  # numpy and torch both take any seed below this
TEACHER_MODES = ("finetune", "linear", "auto")
TEACHER_SAMPLES = 50_000  # a teacher with no epochs set trains until it has seen this many images ...
TEACHER_EPOCHS = (2.0, 30.0)  # ... in at least 2 and at most 30 epochs of its train set
STUDENT_SAMPLES = 50_000  # a fine-tuned student with no epochs set trains until it has seen this many images ...
STUDENT_EPOCHS = (15.0, 100.0)  # ... in at least 15 (the paper's recipe here) and at most 100 epochs of its set
STUDENT_MODES = ("finetune", "linear", "scratch")


@dataclass(frozen=True)
class TrainConfig:
    """A pretrained backbone trained on labelled images: what teacher and student share."""

    model: str = "efficientnet-lite0"  # registry name, timm:NAME or tv:NAME (torchvision; the timm extra)
    res: int = 64  # input size; a timm:/tv: model named on the command line takes its pretrained config's (cli)
    weights: str | None = None  # local pretrained weights (safetensors or torch state dict); None: the built-in/hub
    mode: str = "finetune"
    epochs: float = 2.0
    lr: float = 1e-3
    batch_size: int = 128
    flip: bool = True  # horizontal flips while training (off for e.g. traffic signs)
    seed: int = 0


def epochs_for(n: int, samples: int, lo: float, hi: float) -> float:
    """Epochs of an ``n``-image set that see ``samples`` images, within [lo, hi], to 2 decimals: one rule for the
    teacher's and the student's default length (and the benchmarks that chose them)."""
    return round(min(hi, max(lo, samples / max(1, n))), 2)


@dataclass(frozen=True)
class TeacherConfig(TrainConfig):
    """The sender's teacher: fine-tuned on the labelled target (mode linear: a linear probe; auto: whichever of the
    two labels held-out train rows better, `teacher._train_chosen`)."""

    # None: as many epochs as make TEACHER_SAMPLES images seen, within TEACHER_EPOCHS (`for_train`)
    epochs: float | None = None
    limit: int | None = None  # train on a random subset of this many target images

    def for_train(self, n: int) -> TeacherConfig:
        """This config with its epochs fixed for a train set of ``n`` images (unchanged when epochs is set).

        Why images seen rather than epochs: 2 epochs are 780 steps of CIFAR-10 but 54 of Flowers-5, and on
        held-out train rows the fixed budget fine-tuned small targets to better teachers while leaving every
        target of 25,000 images or more at 2 epochs (benchmarks/reports/teacher_recipe.md).
        """
        if self.epochs is not None:
            return self
        return replace(self, epochs=epochs_for(n, TEACHER_SAMPLES, *TEACHER_EPOCHS))


@dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """The receiver's student. finetune is the paper's recipe (AdamW 1e-3, cosine); linear trains a head only."""

    # None: the student the payload's forecast assumed (`student_mode`): linear for a head payload, else finetune
    mode: str | None = None
    # None: as many epochs as make STUDENT_SAMPLES images seen, within STUDENT_EPOCHS (`for_rows`); a pool
    # mode's fine-tune is bounded from the paper's 15 (`receiver.student_recipe`)
    epochs: float | None = None

    def for_rows(self, n: int) -> StudentConfig:
        """This config with its epochs fixed for a training set of ``n`` images (unchanged when epochs is set).

        Why images seen rather than epochs: 15 epochs of a 1 KB payload (about 500 images) are 60-75 steps, and
        on held-out train rows a student that saw 50,000 images did better on every target measured
        (benchmarks/reports/student_recipe.md).
        """
        if self.epochs is not None:
            return self
        return replace(self, epochs=epochs_for(n, STUDENT_SAMPLES, *STUDENT_EPOCHS))

    def for_receiver(self, receiver: str) -> StudentConfig:
        """This config with its mode resolved for the payload's receiver mode (see `student_mode`)."""
        return self if self.mode is not None else replace(self, mode=student_mode(receiver))


def student_mode(receiver: str) -> str:
    """The student mode used when none is asked for: the one the sender's forecast assumed.

    A head payload's forecast is the head on frozen features, and on held-out target train images a linear
    student on the head's pool labels beat a fine-tuned one on every shared target (far-OOD ones by tens of
    points: fine-tuning on pool images drifts the backbone away from the target's domain); see
    benchmarks/reports/head_student.md. Labels keep the paper's fine-tuned student.
    """
    return HEAD_STUDENT if receiver == "head" else "finetune"


@dataclass(frozen=True)
class SendConfig:
    """What `plada send` does. ``budget`` implies ``policy="auto"``; auto picks policy, Safety-Net and size."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    policy: str = "lowest-energy"
    keep: float | None = None  # share of the pool to keep; None: DEFAULT_KEEP (fixed policies, auto without budget)
    count: int | None = None  # keep exactly this many images instead of a share
    budget: int | None = None  # payload bytes; auto then also picks the keep size
    temperature: float = 1.0  # energy temperature T
    safety_share: float | None = None  # fixed policies: Safety-Net share s of the kept images (None: 0, off)
    alpha: float | None = None  # fixed policies: Safety-Net quota exponent, quota ~ N_c^alpha (None: 0.5)
    seed: int = 0  # selection (random policy, auto's held-out sample and proxies) and the teacher's training
    deciders: int | None = None  # auto, teacher on all of train: deciding teachers (None: auto.DECIDERS)
    holdout_fraction: float | None = None  # auto: train share each decider goes without (None: auto.HOLDOUT_FRACTION)
    holdout_groups: str | None = None  # auto: regex on train file names; a group's images are held out together
    engine: str = "local"  # where the pool is scored: this process or a Ray actor pool
    actors: int | None = None  # ray: actors (None: one per GPU, else one)
    proxy: str = "efficientnet-lite0"  # auto: frozen backbone of the proxy students' features
    proxy_res: int = 64
    device: str = "auto"  # teacher, local scoring, features: auto (cuda, else mps, else cpu), cpu, cuda[:N], mps
    # the receiver mode the payload header names (None: BUDGET_RECEIVER under a budget, else DEFAULT_RECEIVERS);
    # "auto": forecast every label mode with the proxy student and name the best (plain on ties)
    receiver: str | None = None

    @property
    def auto(self) -> bool:
        return self.policy == "auto" or self.budget is not None

    @property
    def sends_head(self) -> bool:
        """Whether the payload carries a head: asked for, or the default under a byte budget."""
        return self.receiver == "head" or (self.receiver is None and self.budget is not None
                                           and BUDGET_RECEIVER == "head")

    def check(self) -> SendConfig:
        """Refuse bad values and options that would not act, before any data is read; returns self."""
        check_teacher(self.teacher)
        _one_of("policy", self.policy, POLICIES)
        _one_of("engine", self.engine, ENGINES)
        if self.receiver is not None:
            _one_of("receiver", self.receiver, (*RECEIVERS, "auto"))
        _device(self.device)
        _finite("temperature", self.temperature, lo=0, lo_open=True)
        _seed(self.seed)
        if self.keep is not None:
            _finite("keep", self.keep, lo=0, hi=1, lo_open=True)
        if self.count is not None:
            _integer("count", self.count, lo=1)
        if self.keep is not None and self.count is not None:
            raise PladaError("give a keep share or a count of images, not both")
        if self.budget is not None:
            _integer("budget", self.budget, lo=1)
        if self.safety_share is not None:
            _finite("safety_share", self.safety_share, lo=0, hi=1)
        if self.alpha is not None:
            _finite("alpha", self.alpha, lo=-10, hi=10)
        if self.actors is not None:
            _integer("actors", self.actors, lo=1)
            if self.engine != "ray":
                raise PladaError("actors only act with engine ray (--engine ray)")
        if self.proxy_res is not None:
            _integer("proxy_res", self.proxy_res, lo=8, hi=1024)
        if self.budget is not None and self.policy not in ("lowest-energy", "auto"):
            raise PladaError(f"a byte budget picks the policy itself (auto); it cannot be combined with policy "
                             f"{self.policy}")
        if self.sends_head:
            self._check_head()
        if self.auto:
            ignored = [n for n, v in (("safety_share", self.safety_share), ("alpha", self.alpha)) if v is not None]
            if self.budget is not None:
                ignored += [n for n, v in (("keep", self.keep), ("count", self.count)) if v is not None]
            if ignored:
                raise PladaError(f"the auto policy chooses {', '.join(ignored)} itself; drop "
                                 f"{' and '.join(ignored)} or choose a fixed --policy")
            if self.deciders is not None:
                _integer("deciders", self.deciders, lo=1, hi=10)
            if self.holdout_fraction is not None:
                _finite("holdout_fraction", self.holdout_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
                if (self.deciders or 1) * self.holdout_fraction >= 1:
                    raise PladaError(f"{self.deciders} held-out slices of {self.holdout_fraction:g} of train leave "
                                     "no train image to fit on")
        else:
            used = [n for n in ("deciders", "holdout_fraction", "holdout_groups") if getattr(self, n) is not None
                    and not (n == "holdout_groups" and self.sends_head)]  # the head's held-out rows use groups
            if used:
                raise PladaError(f"{', '.join(used)} only act under the auto policy (--budget or --policy auto)")
        if not self.auto and not self.sends_head and len(self.receivers) == 1:
            # the proxy's features forecast the auto search, several receiver modes or a head: none of them here
            idle = [n for n in ("proxy", "proxy_res") if getattr(self, n) != getattr(SendConfig, n)]
            if idle:
                raise PladaError(f"{', '.join(idle)} only act under the auto policy, a head, or --set receiver=auto "
                                 f"(receiver {self.receivers[0]} is not forecast); drop {' and '.join(idle)}")
        if self.holdout_groups is not None:
            try:
                re.compile(self.holdout_groups)
            except re.error as e:
                raise PladaError(f"holdout_groups {self.holdout_groups!r} is not a valid regular expression: "
                                 f"{e}") from None
        return self

    def _check_head(self) -> None:
        """receiver=head under a budget sends the head alone: nothing that trains a teacher or picks images acts."""
        if self.budget is None:
            if self.policy == "auto":
                raise PladaError("receiver head sends a head beside a fixed policy's selection, or alone under "
                                 "--budget; the auto policy without a budget does not combine with it")
            return
        default = SendConfig()
        idle = [n for n in ("teacher", "policy", "keep", "count", "temperature", "safety_share", "alpha",
                            "deciders", "holdout_fraction", "engine", "actors")
                if getattr(self, n) != getattr(default, n) and not (n == "policy" and self.policy == "auto")]
        if idle:
            raise PladaError(f"under --budget plada sends a head alone (receiver head: no teacher, no kept images): "
                             f"{', '.join(idle)} do not act; drop them, or add --set receiver=plain to send the "
                             "paper's labels")

    @property
    def receivers(self) -> tuple[str, ...]:
        """The receiver modes the sender forecasts its selection under; the header names one of them."""
        if self.receiver is None:
            return DEFAULT_RECEIVERS
        return LABEL_RECEIVERS if self.receiver == "auto" else (self.receiver,)

    @property
    def keep_share(self) -> float | None:
        """The keep share a fixed size uses: the default 1% unless a count was given."""
        return None if self.count is not None else (DEFAULT_KEEP if self.keep is None else self.keep)


@dataclass(frozen=True)
class ReceiveConfig:
    """What `plada receive` does with a payload: the receiver mode that builds the training set, the student."""

    # plain: the payload's images only; selftrain / propagate also pseudo-label the pool (plada.receiver)
    MODES: typing.ClassVar[tuple[str, ...]] = RECEIVERS  # the modes a payload header may name
    student: StudentConfig = field(default_factory=StudentConfig)
    allow_missing: bool = False  # drop kept images the pool lacks instead of refusing
    mode: str | None = None  # receiver mode; None: the one the payload header names, else plain
    pseudo: int | None = None  # selftrain/propagate: pool images to pseudo-label (None: receiver.PSEUDO_SHARE)
    knn: int | None = None  # propagate: neighbours per pool image (None: receiver.KNN_K)
    rounds: int | None = None  # selftrain: fit-label rounds (None: receiver.SELFTRAIN_ROUNDS)
    device: str = "auto"  # student and features: auto (cuda, else mps, else cpu), cpu, cuda[:N], mps

    def check(self) -> ReceiveConfig:
        """Refuse bad values and, once the mode is known, knobs it would ignore; returns self.

        With ``mode`` None the payload header decides, so mode-specific knobs are checked again by
        `pipeline.receive` after the header is read.
        """
        check_student(self.student)
        _device(self.device)
        if self.mode is not None:
            _one_of("receiver mode", self.mode, self.MODES)
        if self.pseudo is not None:
            _integer("pseudo", self.pseudo, lo=1)
        if self.knn is not None:
            _integer("knn", self.knn, lo=1, hi=50)
        if self.rounds is not None:
            _integer("rounds", self.rounds, lo=1, hi=10)
        if self.mode is not None:
            acting = {"pseudo": self.mode != "plain", "knn": self.mode == "propagate",
                      "rounds": self.mode == "selftrain"}
            idle = [n for n, acts in acting.items() if getattr(self, n) is not None and not acts]
            if idle:
                raise PladaError(f"{', '.join(idle)} do not act with receiver mode {self.mode}; drop "
                                 f"{' and '.join(idle)} or choose another --receiver")
        return self


def check_teacher(t: TeacherConfig) -> None:
    _check_train("teacher", t.for_train(1), TEACHER_MODES)
    if t.limit is not None:
        _integer("teacher.limit", t.limit, lo=1)


def check_student(s: StudentConfig) -> None:
    _check_train("student", (s if s.mode is not None else replace(s, mode="finetune")).for_rows(1), STUDENT_MODES)


def _check_train(name: str, c: TrainConfig, modes: typing.Sequence[str]) -> None:
    """The recipe fields teacher and student share, named `name.field` in every message."""
    _model(f"{name}.model", c.model)
    _integer(f"{name}.res", c.res, lo=8, hi=1024)
    _one_of(f"{name}.mode", c.mode, modes)
    _finite(f"{name}.epochs", c.epochs, lo=0, hi=1000, lo_open=True)
    _finite(f"{name}.lr", c.lr, lo=0, hi=10, lo_open=True)
    _integer(f"{name}.batch_size", c.batch_size, lo=1, hi=65536)
    _seed(c.seed)
    if c.weights is not None:
        if c.model == "small-cnn" or c.mode == "scratch":
            raise PladaError(f"{name}.weights do not act with a model trained from scratch ({name}.model "
                             f"{c.model}, mode {c.mode}); drop them")
        if not isinstance(c.weights, str) or not os.path.isfile(c.weights):
            raise PladaError(f"{name}.weights {c.weights!r} is not a file")


def with_seed(cfg: Any, seed: int) -> Any:
    """The one `--seed` for every nested config that has one (selection, teacher, student)."""
    _seed(seed)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "seed":
            changes["seed"] = seed
        elif dataclasses.is_dataclass(v):
            changes[f.name] = with_seed(v, seed)
    return replace(cfg, **changes)


def keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every ``--set`` key of a config, nested ones dotted."""
    out = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out += keys(v, f"{prefix}{f.name}.") if dataclasses.is_dataclass(v) else [prefix + f.name]
    return out


def apply_sets(cfg: Any, sets: typing.Iterable[str], allowed: typing.Container[str] | None = None) -> Any:
    """``cfg`` with each ``key=value`` applied, the value parsed by the field's type; unknown keys refused."""
    for item in sets:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PladaError(f"--set takes key=value, got {item!r}")
        if key not in keys(cfg) or (allowed is not None and key not in allowed):
            have = [k for k in keys(cfg) if allowed is None or k in allowed]
            raise PladaError(f"unknown setting {key!r} here (have: {', '.join(have)})")
        cfg = _set(cfg, key.split("."), text.strip(), key)
    return cfg


def _set(cfg: Any, path: list[str], text: str, key: str) -> Any:
    name = path[0]
    if len(path) > 1:
        return replace(cfg, **{name: _set(getattr(cfg, name), path[1:], text, key)})
    hint = typing.get_type_hints(type(cfg))[name]
    return replace(cfg, **{name: parse_value(text, hint, key)})


def parse_value(text: str, hint: Any, key: str) -> Any:
    """A ``--set`` value as its field's type: int, float, bool, str, or any of them or None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return parse_value(text, inner[0], key)
    try:
        if hint is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if hint is int:
            return int(text)
        if hint is float:
            return float(text)
    except ValueError:
        raise PladaError(f"{key} takes {getattr(hint, '__name__', hint)}, got {text!r}") from None
    return text


def _finite(name: str, v: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            hi_open: bool = False) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        rng = " and ".join(s for s in (lo_s, hi_s) if s)
        raise PladaError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {v!r}")


def _integer(name: str, v: Any, lo: int | None = None, hi: int | None = None) -> None:
    if (not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo)
            or (hi is not None and v > hi)):
        rng = f" between {lo} and {hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise PladaError(f"{name} must be an integer{rng}, got {v!r}")


def _seed(v: Any) -> None:
    _integer("seed", v, lo=0, hi=MAX_SEED)


def _one_of(name: str, v: Any, allowed: typing.Sequence[str]) -> None:
    if v not in allowed:
        raise PladaError(f"unknown {name} {v!r} (have: {', '.join(allowed)})")


# The registry's names (plada.backbones.REGISTRY, checked by a test), so a config checks without importing torch.
MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "small-cnn")


def _model(name: str, v: Any) -> None:
    ok = isinstance(v, str) and (v in MODELS or any(v.startswith(p) and len(v) > len(p) for p in ("timm:", "tv:")))
    if not ok:
        raise PladaError(f"unknown {name} {v!r} (have: {', '.join(MODELS)}, or timm:NAME, tv:NAME)")
