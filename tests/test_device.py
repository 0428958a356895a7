"""`--device` (issue 18): names, refusals before any work, the CPU reference path, and the accelerator path's logic.

No GPU is needed: absent accelerators are simulated by monkeypatching torch's probes, and the accelerator
code path (`train._fit_on`, `train._predict_on`) is run on the CPU, where it must agree with the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import one_line, run

from plada import backbones, device, pipeline, train
from plada.config import ReceiveConfig, SendConfig
from plada.errors import PladaError

FAST = ["--set", "teacher.res=32", "--set", "teacher.epochs=2", "--keep", "10%"]


@pytest.fixture()
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without CUDA or MPS, whatever it really has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_is_cpu_without_accelerators(no_accelerator: None) -> None:
    assert device.resolve("auto") == torch.device("cpu")
    assert device.resolve() == torch.device("cpu")
    assert device.resolve("cpu") == torch.device("cpu")
    assert device.as_device(None) == torch.device("cpu")


def test_auto_prefers_cuda_then_mps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert device.resolve("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device.resolve("auto").type == "cuda"


@pytest.mark.parametrize("name", ["tpu", "cuda:x", "cuda:", "CUDA", "gpu", "", "cuda:-1", " cpu", 0, None])
def test_bad_syntax_refused(name: object) -> None:
    with pytest.raises(PladaError, match="unknown device"):
        device.check_syntax(name)
    with pytest.raises(PladaError, match="unknown device"):
        SendConfig(device=name).check()  # type: ignore[arg-type]
    with pytest.raises(PladaError, match="unknown device"):
        ReceiveConfig(device=name).check()  # type: ignore[arg-type]


def test_absent_accelerators_refused(no_accelerator: None, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(PladaError, match="no CUDA GPU"):
            SendConfig(device=name).check()
    with pytest.raises(PladaError, match="no Apple MPS"):
        ReceiveConfig(device="mps").check()
    SendConfig(device="cpu").check()
    SendConfig(device="auto").check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(PladaError, match=r"cuda:3 does not exist: this machine has 2 CUDA GPU\(s\)"):
        device.resolve("cuda:3")
    assert device.resolve("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("verb", ["send", "score", "receive", "demo"])
@pytest.mark.parametrize("name", ["cuda", "cuda:3", "mps"])
def test_cli_absent_device_is_one_line_before_any_work(verb: str, name: str, tiny_data: Path, cache: Path,
                                                        tmp_path: Path, no_accelerator: None,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    def untouchable(*a: object, **k: object) -> None:
        raise AssertionError("data was read or a model trained before the device was checked")

    for fn in ("open_target", "open_any", "train_teacher", "train_student"):
        monkeypatch.setattr(pipeline, fn, untouchable)
    out = tmp_path / "out.plada"
    argv = {"send": ["send", "tinytarget", "-o", str(out)],
            "score": ["score", "tinytarget"],
            "receive": ["receive", str(tmp_path / "absent.plada")],  # the device is refused before the payload
            "demo": ["demo", "--target", "tinytarget", "--out-dir", str(tmp_path / "demo")]}[verb]
    code, _, err = run(capsys, *argv, "--pool", "tinypool", "--data", str(tiny_data), "--device", name)
    assert code == 2 and one_line(err), err
    assert err.startswith("plada: error: device ") and ("no CUDA GPU" in err or "no Apple MPS" in err), err
    assert not out.exists() and not (tmp_path / "demo").exists()
    assert not (cache / "teachers").exists() and not (cache / "scores").exists()


@pytest.mark.parametrize("name", ["tpu", "cuda:x"])
def test_cli_bad_syntax_is_one_line(name: str, tiny_data: Path, cache: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                       "-o", str(tmp_path / "x.plada"), "--device", name)
    assert code == 2 and one_line(err) and "unknown device" in err, err
    code, _, err = run(capsys, "receive", str(tmp_path / "x.plada"), "--set", f"device={name}")
    assert code == 2 and one_line(err) and "unknown device" in err, err


def test_settings_list_device(capsys: pytest.CaptureFixture) -> None:
    code, table, err = run(capsys, "settings")
    assert code == 0, err
    assert table["send"]["device"] == "auto" and table["receive"]["device"] == "auto"


def test_cpu_send_byte_identical_to_default(tiny_data: Path, tmp_path: Path, no_accelerator: None,
                                            monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Fresh caches each time: `--device cpu` retrains the teacher and must write the very bytes of the default."""
    outs = []
    for i, extra in enumerate(([], ["--device", "cpu"])):
        monkeypatch.setenv("PLADA_CACHE", str(tmp_path / f"cache{i}"))
        outs.append(tmp_path / f"p{i}.plada")
        code, sent, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                              "-o", str(outs[-1]), *FAST, *extra)
        assert code == 0, err
        assert sent["device"] == "cpu"
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_amp_dtype_choice() -> None:
    cuda = torch.device("cuda", 0)
    assert device.amp_dtype(torch.device("cpu")) is None
    assert device.amp_dtype(torch.device("mps")) is None
    assert device.amp_dtype(cuda, capability=(8, 0)) is torch.bfloat16  # Ampere
    assert device.amp_dtype(cuda, capability=(9, 0)) is torch.bfloat16  # Hopper
    assert device.amp_dtype(cuda, capability=(7, 5)) is torch.float16  # Turing: fp16 ...
    assert device.needs_scaler(torch.float16)  # ... with a GradScaler
    assert not device.needs_scaler(torch.bfloat16) and not device.needs_scaler(None)


@pytest.mark.parametrize("shape, flip", [((5, 16, 16, 3), True), ((4, 24, 17, 3), False), ((3, 7, 7, 1), True)])
def test_device_augment_is_the_cpu_augment(shape: tuple[int, ...], flip: bool) -> None:
    """The accelerator's one-gather augmentation moves exactly the pixels `_augment` moves, with its draws."""
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = train._augment(x, g1, flip)
    got = train._augment_apply(x, *train._augment_draws(g2, x.shape, flip))
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))  # the same draws consumed


def test_prefetched_keeps_order_raises_and_stops() -> None:
    assert list(train._prefetched(iter(range(50)), depth=3)) == list(range(50))

    def broken():
        yield 1
        raise ValueError("read failed")

    with pytest.raises(ValueError, match="read failed"):
        list(train._prefetched(broken()))
    made = []

    def endless():
        i = 0
        while True:
            made.append(i)
            yield i
            i += 1

    stream = train._prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()  # joins the producer: it must notice and stop, not run forever
    assert len(made) <= 5


def _tiny_model() -> backbones.Classifier:
    torch.manual_seed(0)
    return backbones.create("small-cnn", 3, 16, pretrained=False)


def test_accelerator_path_on_cpu_agrees_with_reference() -> None:
    """`_fit_on` and `_predict_on` run on the CPU (no autocast there) and track the reference to float rounding."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 40)
    cpu = torch.device("cpu")
    a, b = _tiny_model(), _tiny_model()
    ref = train.fit(a, images, labels, epochs=2, batch_size=16, seed=5, progress=False)
    got = train._fit_on(cpu, b, images, labels, 6, 1e-3, 16, 0.05, np.random.default_rng(5),
                        torch.Generator().manual_seed(5), True, True, 0.1, False, "t", False)
    assert len(ref) == len(got) == 6
    # the first step sees the same batch and weights; later ones drift by float rounding only (channels_last
    # convolutions round differently), far less than another batch or schedule would move them
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got, ref, rtol=1e-2)
    want = train.predict(a, images, batch_size=7, progress=False)
    out = train._predict_on(cpu, a, images, batch_size=7, desc="p", progress=False, features=False)
    assert out.dtype == np.float32 and out.shape == want.shape == (40, 3)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)
    feats = train._predict_on(cpu, a, images[:0], batch_size=7, desc="p", progress=False, features=True)
    assert feats.shape == (0, a.dim)


def test_explicit_cpu_is_the_reference_path() -> None:
    """`device="cpu"` and the default None run the very same code: bit-identical weights, logits and heads."""
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    a, b = _tiny_model(), _tiny_model()
    assert train.fit(a, images, labels, 1, batch_size=8, seed=1, progress=False) == train.fit(
        b, images, labels, 1, batch_size=8, seed=1, progress=False, device="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert np.array_equal(train.predict(a, images, progress=False),
                          train.predict(b, images, progress=False, device=torch.device("cpu")))
    f = rng.normal(size=(30, 8)).astype(np.float32)
    y = rng.integers(0, 3, 30)
    w0, b0 = train.train_head(f, y, 3, steps=20)
    w1, b1 = train.train_head(f, y, 3, steps=20, device="cpu")
    assert np.array_equal(w0, w1) and np.array_equal(b0, b1)


def test_placed_returns_the_model_trainable() -> None:
    """A model borrowed under inference mode must come back with ordinary, trainable weights."""
    m = _tiny_model()
    with torch.inference_mode(), device.placed(m, torch.device("cpu")):
        pass
    assert not any(p.is_inference() for p in m.parameters())
    assert next(m.parameters()).device.type == "cpu"
