"""The model registry without the timm extra: preprocessing per model, local weights files, clear refusals."""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line

from plada import backbones, config
from plada.errors import PladaError


def _old_prepare(batch: torch.Tensor, res: int) -> torch.Tensor:
    """prepare as every earlier release computed it (EfficientNet-Lite's 0.5/0.5, bilinear)."""
    x = batch.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-1] != res or x.shape[-2] != res:
        x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False, antialias=x.shape[-1] > res)
    return x.sub_(0.5).div_(0.5)


@pytest.mark.parametrize("side", [32, 24, 48])  # same size, upscaled, downscaled (antialiased)
def test_lite_preprocessing_is_bit_identical(side: int) -> None:
    model = backbones.create("efficientnet-lite0", 3, 32, pretrained=False)
    assert model.mean == (0.5,) * 3 and model.std == (0.5,) * 3 and model.interpolation == "bilinear"
    batch = torch.randint(0, 256, (4, side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    want = _old_prepare(batch, 32)
    assert torch.equal(backbones.prepare(batch, model), want)
    assert torch.equal(backbones.prepare(batch, 32), want)  # a bare resolution means the same


def test_per_channel_normalisation() -> None:
    model = backbones.Classifier(torch.nn.Flatten(), 3, 2, 1, "t", mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 2.0))
    batch = torch.full((1, 1, 1, 3), 255, dtype=torch.uint8)
    assert torch.allclose(backbones.prepare(batch, model).flatten(), torch.tensor([1.8, 3.2, 0.35]))


@pytest.mark.parametrize("name, module", [("timm:resnet18.a1_in1k", "timm"), ("tv:resnet18", "torchvision")])
def test_missing_extra_is_one_line(name: str, module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for m in [k for k in sys.modules if k == module or k.startswith(module + ".")] + [module, f"{module}.models"]:
        monkeypatch.setitem(sys.modules, m, None)  # import fails as if not installed
    with pytest.raises(PladaError) as e:
        backbones.create(name, 3, 32, pretrained=False)
    assert one_line(str(e.value)) and "[timm]" in str(e.value)


def test_load_weights_is_strict_and_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    good = {k: torch.randn_like(v) for k, v in net.state_dict().items()}
    path = tmp_path / "w.bin"  # safetensors recognised by its header, whatever the suffix
    save_file(good, str(path))
    backbones.load_weights(net, str(path), "m")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in good.items())
    pt = tmp_path / "ckpt.pt"  # a training checkpoint wrapping the state dict, plus a head to drop
    torch.save({"state_dict": {**good, "fc.weight": torch.zeros(1)}, "epoch": 3}, pt)
    backbones.load_weights(net, str(pt), "m", head=("fc",))
    garbage, partial = tmp_path / "g.pt", tmp_path / "p.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    save_file({"0.weight": good["0.weight"]}, str(partial))
    for bad, says in ((garbage, "cannot read"), (partial, "3 backbone keys missing"), (tmp_path / "no", "not found")):
        with pytest.raises(PladaError) as e:
            backbones.load_weights(net, str(bad), "m")
        assert one_line(str(e.value)) and says in str(e.value), e.value


def test_weights_setting_is_checked_up_front(tmp_path: Path) -> None:
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    config.check_teacher(config.TeacherConfig(model="tv:resnet18", weights=str(f)))
    assert "teacher.weights" in config.keys(config.SendConfig())
    assert "student.weights" in config.keys(config.ReceiveConfig())
    with pytest.raises(PladaError, match="is not a file"):
        config.check_teacher(config.TeacherConfig(model="timm:resnet18", weights=str(tmp_path / "absent")))
    with pytest.raises(PladaError, match="do not act"):
        config.check_student(config.StudentConfig(mode="scratch", weights=str(f)))


def test_teacher_cache_key_follows_the_weights_content(tmp_path: Path) -> None:
    from plada.teacher import _key_config

    plain = config.TeacherConfig()
    old = asdict(plain)
    del old["weights"]
    assert _key_config(plain) == old  # no weights file: the key of earlier releases, so caches stay valid
    f = tmp_path / "w.pt"
    f.write_bytes(b"one")
    first = _key_config(config.TeacherConfig(weights=str(f)))
    f.write_bytes(b"two")
    assert _key_config(config.TeacherConfig(weights=str(f))) != first
