"""timm and torchvision backbones (the `timm` extra): local weights, their own preprocessing, end to end.

Deselected by default (`-m timm` runs them; CI does, in a venv with the extra). Tiny architectures with
random weights saved to a local file stand in for real checkpoints, so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, run

from plada import backbones
from plada.errors import PladaError

pytestmark = pytest.mark.timm
timm = pytest.importorskip("timm")

ARCH = "test_efficientnet"  # ~0.1M parameters, ImageNet mean/std in its pretrained config


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """(safetensors file, the full timm model it came from): random weights, classifier head included."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    ref = timm.create_model(ARCH, pretrained=False).eval()
    with torch.no_grad():  # BN statistics away from their defaults, so a skipped load would show
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("w") / f"{ARCH}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    return path, ref


def test_timm_loads_exactly_the_local_weights(timm_file: tuple[Path, torch.nn.Module]) -> None:
    path, ref = timm_file
    model = backbones.create(f"timm:{ARCH}", 3, res=32, pretrained=True, weights=str(path)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        assert torch.equal(model.features(x), want)
        assert model(x).shape == (2, 3)
    # a torch state dict (not safetensors) loads the same
    pt = path.with_suffix(".pt")
    torch.save(ref.state_dict(), pt)
    again = backbones.create(f"timm:{ARCH}", 3, res=32, weights=str(pt)).eval()
    with torch.no_grad():
        assert torch.equal(again.features(x), want)


def test_timm_preprocessing_comes_from_its_pretrained_config(timm_file: tuple[Path, torch.nn.Module],
                                                             tmp_path: Path) -> None:
    import timm.data

    path, ref = timm_file
    cfg = timm.data.resolve_data_config({}, model=ref)
    model = backbones.create(f"timm:{ARCH}", 3, res=32, weights=str(path))
    assert model.mean == tuple(cfg["mean"]) != (0.5, 0.5, 0.5) and model.std == tuple(cfg["std"])
    assert model.interpolation == cfg["interpolation"] and model.native_res == cfg["input_size"][-1]
    batch = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    x = batch.permute(0, 3, 1, 2).float() / 255
    want = (x - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    assert torch.allclose(backbones.prepare(batch, model), want, atol=1e-6)
    # a saved model comes back with the same preprocessing and weights
    backbones.save(model, tmp_path / "m.safetensors", ["a", "b", "c"])
    back, _, _ = backbones.load(tmp_path / "m.safetensors")
    assert back.mean == model.mean and back.interpolation == model.interpolation
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values(), strict=True))


def test_timm_wrong_weights_file_is_one_line(timm_file: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path, _ = timm_file
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a weights file at all")
    other = tmp_path / "other.safetensors"  # another architecture's weights
    save_file(timm.create_model("test_resnet", pretrained=False).state_dict(), str(other))
    for bad, says in ((garbage, "cannot read weights file"), (other, "does not fit this architecture"),
                      (tmp_path / "absent.pt", "not found")):
        with pytest.raises(PladaError) as e:
            backbones.create(f"timm:{ARCH}", 3, res=32, weights=str(bad))
        assert says in str(e.value) and one_line(str(e.value)), e.value
    with pytest.raises(PladaError, match="unknown timm model"):
        backbones.create("timm:no_such_model_anywhere", 3, res=32, weights=str(path))


def test_timm_without_weights_offline_says_pass_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """No hub cache and no network: one line naming the setting, not a traceback from the hub client."""
    real = timm.create_model

    def offline(name: str, pretrained: bool = False, **kw: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nsecond line")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PladaError) as e:
        backbones.create(f"timm:{ARCH}", 3, res=32, pretrained=True)
    assert one_line(str(e.value)) and "teacher.weights=FILE" in str(e.value)
    assert backbones.create(f"timm:{ARCH}", 3, res=32, pretrained=False).mean != (0.5, 0.5, 0.5)


def test_timm_teacher_and_student_end_to_end(timm_file: tuple[Path, torch.nn.Module], tiny_data: Path, cache: Path,
                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """send (fine-tune, score, select) and receive with a timm teacher and student from a local weights file."""
    path, _ = timm_file
    out = tmp_path / "t.plada"
    common = ["--pool", "tinypool", "--data", str(tiny_data)]

    def send(to: Path) -> tuple[int, dict | None, str]:
        return run(capsys, "send", "tinytarget", *common, "-o", str(to), "--teacher", f"timm:{ARCH}", "--keep", "10%",
                   "--set", f"teacher.weights={path}", "--set", "teacher.res=32", "--set", "teacher.epochs=1",
                   "--set", "teacher.batch_size=32")

    code, sent, err = send(out)
    assert code == 0, err
    assert sent["kept"] == 32 and 0.0 <= sent["teacher_accuracy"] <= 1.0
    code, _, err = send(tmp_path / "u.plada")  # the cached teacher (keyed by the weights' content) and scores
    assert code == 0, err
    assert out.read_bytes() == (tmp_path / "u.plada").read_bytes()
    code, rec, err = run(capsys, "receive", str(out), *common, "--test", "tinytarget", "--student", f"timm:{ARCH}",
                         "--set", f"student.weights={path}", "--set", "student.res=32", "--set", "student.epochs=1",
                         "--set", "student.batch_size=16")
    assert code == 0, err
    assert 0.0 <= rec["student_accuracy"] <= 1.0
    # the weights file reaches the teacher: without it (and offline) the send is refused in one line
    code, _, err = run(capsys, "send", "tinytarget", *common, "-o", str(tmp_path / "v.plada"), "--teacher",
                       f"timm:{ARCH}", "--set", f"teacher.weights={tmp_path / 'absent.safetensors'}")
    assert code == 2 and one_line(err) and "teacher.weights" in err


def test_tv_model_local_weights_and_preprocessing(tmp_path: Path, tiny_data: Path) -> None:
    tvm = pytest.importorskip("torchvision.models")
    from safetensors.torch import save_file

    from plada.config import TeacherConfig
    from plada.data import load_source
    from plada.teacher import train_teacher
    from plada.train import predict

    torch.manual_seed(2)
    ref = tvm.get_model("shufflenet_v2_x0_5", weights=None).eval()
    path = tmp_path / "shufflenet.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = backbones.create("tv:shufflenet_v2_x0_5", 3, res=32, weights=str(path)).eval()
    assert model.mean == (0.485, 0.456, 0.406) and model.dim == ref.fc.in_features
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref.fc = torch.nn.Identity()
        assert torch.equal(model.features(x), ref(x))
    with pytest.raises(PladaError) as e:
        backbones.create("tv:resnet18", 3, res=32, weights=str(path))
    assert one_line(str(e.value)) and "does not fit" in str(e.value)
    # a few fine-tune steps and a score through the library
    src = load_source("tinytarget", tiny_data, progress=False)
    cfg = TeacherConfig(model="tv:shufflenet_v2_x0_5", res=32, epochs=0.2, batch_size=32, weights=str(path))
    teacher, info = train_teacher(src.split("train"), src.split("test"), cfg, tmp_path / "teachers", progress=False)
    assert 0 <= info["test_accuracy"] <= 1 and teacher.mean == model.mean
    logits = predict(teacher, src.split("test").images[:8], progress=False)
    assert logits.shape == (8, 3) and np.isfinite(logits).all()


def test_timm_and_tv_models_read_at_their_pretrained_input_size() -> None:
    """A timm or torchvision model named on the command line gets its pretrained config's input size as `res`,
    unless `--set ROLE.res` says otherwise; plada's own models keep 64."""
    import timm.models

    from plada.cli import _receive_cfg, _send_cfg, build_parser

    cfg = timm.models.get_pretrained_cfg(ARCH)
    want = (getattr(cfg, "test_input_size", None) or cfg.input_size)[-1]
    parse = build_parser().parse_args
    assert _send_cfg(parse(["send", "t", "-o", "x", "--teacher", f"timm:{ARCH}"])).teacher.res == want
    assert _send_cfg(parse(["send", "t", "-o", "x", "--teacher", f"timm:{ARCH}", "--set", "teacher.res=32"])
                     ).teacher.res == 32
    assert _send_cfg(parse(["send", "t", "-o", "x"])).teacher.res == 64
    assert _receive_cfg(parse(["receive", "t.plada", "--student", "tv:shufflenet_v2_x0_5"])).student.res == 224
    assert _receive_cfg(parse(["receive", "t.plada", "--student", f"timm:{ARCH}", "--set", "student.res=48"])
                        ).student.res == 48
    with pytest.raises(PladaError, match="unknown timm model"):
        backbones.native_res("timm:no_such_model_anywhere")
