"""End to end on tiny synthetic data through the real CLI: send, inspect, receive, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_line, run

from plada import payload
from plada.cli import main
from plada.score import energy

FAST = ["--set", "teacher.res=32", "--set", "teacher.epochs=4", "--keep", "10%"]
FORECAST = [*FAST, "--set", "receiver=auto"]  # the sender forecasts every receiver mode


def test_send_inspect_receive(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "t.plada"
    # a linear-probe teacher and a Safety-Net, so the 96 kept images cover every colour (lowest energy alone keeps
    # one colour on this pool); the student then has something to learn
    code, sent, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                          "-o", str(out), "--set", "teacher.res=32", "--set", "teacher.mode=linear", "--keep", "30%",
                          "--set", "safety_share=0.5", "--set", "receiver=auto")
    assert code == 0, err
    assert sent["kept"] == 96 and sent["pool_size"] == 320 and min(sent["kept_per_class"]) > 0
    assert sent["payload_bytes"] == out.stat().st_size < 1000
    assert 0.0 <= sent["teacher_accuracy"] <= 1.0

    code, info, err = run(capsys, "inspect", str(out))
    assert code == 0, err
    assert info["count"] == 96 and info["format"] == "1.0"
    assert info["forecast"] is None  # a fixed policy sends no forecast ...
    fc = sent["receiver_forecasts"]  # ... but ranks the receiver modes by one, and the header names the best
    assert set(fc) == {"plain", "selftrain", "propagate"} and info["receiver"] == sent["receiver"]
    assert fc[sent["receiver"]] == max(fc.values())
    # how the selection was made is in the report beside the payload, not in it
    report = json.loads((tmp_path / "t.plada.json").read_text())
    assert report["plada"] == "send report" and report["payload_bytes"] == out.stat().st_size
    assert report["selection"]["policy"] == "lowest-energy" and report["selection"]["safety_share"] == 0.5
    assert report["selection"]["teacher"]["mode"] == "linear"

    model = tmp_path / "student.safetensors"
    code, rec, err = run(capsys, "receive", str(out), "--pool", "tinypool", "--data", str(tiny_data),
                         "--test", "tinytarget", "--set", "student.res=32", "--student-mode", "linear",
                         "--model-out", str(model))
    assert code == 0, err
    assert rec["student_accuracy"] > 0.7  # three colours: chance is 1/3, and the student never saw a target image
    assert model.is_file()


@pytest.mark.slow
def test_teacher_is_real(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Three well-separated colours: a fine-tuned teacher must beat chance by far."""
    code, sent, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                          "-o", str(tmp_path / "a.plada"), "--set", "teacher.res=32", "--set", "teacher.epochs=15")
    assert code == 0, err
    assert sent["teacher_accuracy"] > 0.8


def test_same_seed_same_bytes(tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture) -> None:
    """Fresh caches each time, so the teacher is retrained: the payload must still be byte-identical."""
    outs = []
    for i in range(2):
        monkeypatch.setenv("PLADA_CACHE", str(tmp_path / f"cache{i}"))
        outs.append(tmp_path / f"p{i}.plada")
        code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                           "-o", str(outs[-1]), *FORECAST)
        assert code == 0, err
    assert outs[0].read_bytes() == outs[1].read_bytes()


def test_send_for_one_receiver_mode(tiny_data: Path, cache: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    """`--set receiver=MODE` names that mode without forecasting; an unknown mode is one line, nothing written."""
    out = tmp_path / "s.plada"
    code, sent, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "-o", str(out),
                          *FAST, "--set", "receiver=selftrain")
    assert code == 0, err
    assert payload.read(out).receiver == sent["receiver"] == "selftrain" and "receiver_forecasts" not in sent
    bad = tmp_path / "bad.plada"
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "-o", str(bad),
                       *FAST, "--set", "receiver=telepathy")
    assert code == 2 and "receiver" in err and "telepathy" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()


def test_policies_differ(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    got = {}
    for policy in ("lowest-energy", "highest-energy", "random"):
        out = tmp_path / f"{policy}.plada"
        code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                           "-o", str(out), "--policy", policy, *FAST)
        assert code == 0, err
        got[policy] = set(payload.read(out).indices.tolist())
    assert not got["lowest-energy"] & got["highest-energy"]  # 10% from each end of the ranking
    assert got["random"] != got["lowest-energy"]


@pytest.fixture(scope="module")
def sent_payload(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One payload sent once for the tests that only need *a* valid payload to damage or misroute."""
    out = tmp_path_factory.mktemp("sent") / "t.plada"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PLADA_CACHE", str(out.parent / "cache"))
        assert main(["--json", "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "-o", str(out),
                     *FAST]) == 0
    return out.read_bytes()


def test_wrong_pool_refused(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                            sent_payload: bytes) -> None:
    out = tmp_path / "t.plada"
    out.write_bytes(sent_payload)
    # a pool of the same size but other images: only the fingerprint can tell
    code, _, err = run(capsys, "pool", "build", "tinytarget:train,test", "--name", "other", "--data", str(tiny_data))
    assert code == 0, err
    model = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "receive", str(out), "--pool", "other", "--data", str(tiny_data),
                       "--model-out", str(model))
    assert code == 2
    assert "payload was made for pool" in err and len(err.strip().splitlines()) == 1
    assert not model.exists()


def test_energy_sign() -> None:
    logits = np.array([[10.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    e = energy(logits, T=1.0)
    assert e[0] < e[1]  # confident sample has the lower energy
    assert np.allclose(energy(logits, T=2.0), -2.0 * np.log(np.exp(logits / 2.0).sum(1)))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["send", "tinytarget", "--pool", "tinypool", "--data", "/nonexistent/dir", "-o", "x.plada"],
         "data folder not found"),
        (["receive", "missing.plada", "--pool", "tinypool"], "payload not found"),
        (["inspect", "missing.plada"], "payload not found"),
        (["send", "tinytarget", "--pool", "tinypool", "-o", "x.plada", "--budget", "1KB", "--set", "receiver=plain",
          "--set", "deciders=5",
          "--set", "holdout_fraction=0.2"], "leave no train image"),
    ],
)
def test_bad_input_one_line(argv: list[str], message: str, cache: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = subprocess.run([sys.executable, "-m", "plada.cli", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.plada").exists()


def test_wrong_layout(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    from conftest import write_archive

    write_archive(tmp_path / "flat.tar", "flat", {"a.png": b"x", "b.png": b"y"})
    code, _, err = run(capsys, "send", str(tmp_path / "flat.tar"), "--pool", "tinypool", "--data", str(tmp_path),
                       "-o", str(tmp_path / "x.plada"))
    assert code == 2 and "ImageFolder layout" in err
    assert not (tmp_path / "x.plada").exists()


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_payload(damage: str, tiny_data: Path, cache: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture, sent_payload: bytes) -> None:
    out = tmp_path / "t.plada"
    raw = bytearray(sent_payload)
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0x10
    out.write_bytes(bytes(raw))
    code, _, err = run(capsys, "receive", str(out), "--pool", "tinypool", "--data", str(tiny_data))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_send_with_byte_budget(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--budget` picks policy and size by proxy students: the payload fits and records its forecast."""
    out = tmp_path / "b.plada"
    code, sent, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                          "-o", str(out), "--set", "teacher.res=32", "--set", "teacher.epochs=4", "--budget", "1KB",
                          "--set", "receiver=plain")
    assert code == 0, err
    assert sent["payload_bytes"] == out.stat().st_size <= 1000
    assert 0.0 <= sent["forecast_accuracy"] <= 1.0
    p = payload.read(out)
    assert p.forecast == round(sent["forecast_accuracy"], 4) and p.receiver == "plain"
    assert sent["auto"]["budget_bytes"] == 1000 and sent["selection"]["policy"] != "auto"
    # the teacher used all of train, so (default) two teachers each without its own auto.HOLDOUT_FRACTION (20%)
    # slice decided, and the best forecast's own selection and labels were sent
    assert sent["auto"]["heldout_images"] == 24  # tinytarget: 3 colours x 40 train images
    j = sent["auto"]["decider"]
    assert j in (0, 1)
    assert {c["decider"] for c in sent["auto"]["candidates"]} == {0, 1}  # both teachers' selections competed
    # the full teacher would label nothing, so only the deciding teachers were fine-tuned; the sender is reported
    assert len(list((cache / "teachers").iterdir())) == 2
    assert 0 <= sent["teacher_accuracy"] <= 1
    assert sent["selection"]["teacher"]["test_accuracy"] == sent["teacher_accuracy"]
    assert json.loads((tmp_path / "b.plada.json").read_text())["auto"] == sent["auto"]
    assert sent["auto"]["payload_bytes"] == sent["payload_bytes"]  # sized exactly as written
    assert sent["kept_per_class"] == np.bincount(p.labels, minlength=3).tolist()
    code, info, err = run(capsys, "inspect", str(out))
    assert code == 0 and info["forecast"] == round(sent["forecast_accuracy"], 4)
    with pytest.raises(SystemExit) as exit_info:
        main(["send", "tinytarget", "--pool", "tinypool", "-o", str(tmp_path / "c.plada"), "--budget", "ten"])
    assert exit_info.value.code == 2 and "not a size" in capsys.readouterr().err


@pytest.mark.slow
def test_send_holds_out_whole_groups(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     fold_split_calls: list) -> None:
    """`--holdout-groups`: no deciding teacher trains on an image of a group it is scored on."""
    seen = fold_split_calls
    args = ["send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "--set", "teacher.res=32",
            "--set", "teacher.epochs=4", "--budget", "1KB", "--set", "receiver=plain",
            "--set", "deciders=3", "--set", "holdout_fraction=0.3"]
    code, _, err = run(capsys, *args, "-o", str(tmp_path / "bad.plada"), "--set", "holdout_groups=(")
    assert code == 2 and one_line(err) and "regular expression" in err and not seen  # refused before any work
    out = tmp_path / "g.plada"
    code, sent, err = run(capsys, *args, "-o", str(out), "--set", r"holdout_groups=^\d(\d)")  # tens digit of 000-039
    assert code == 0, err
    (groups, splits), = seen
    assert len(np.unique(groups)) == 3 * 4  # 3 colours x 4 groups of 10 file names
    for fit, held in splits:
        assert not set(groups[fit]) & set(groups[held])
    # whole groups of 10 until 30% of the images: 40, 40, then the 30 left before the last group
    assert [len(h) for _, h in splits] == [40, 40, 30]
    assert sent["auto"]["heldout_images"] in (30, 40)  # the sending decider's own slice
    # one deciding teacher, grouped: by default without auto.HOLDOUT_FRACTION (20%) of train, i.e. whole
    # groups of 10 until 24 of the 120 images are held out: 30 (10% would hold out 20); --holdout-fraction overrides
    args1 = args[:-4]
    for extra, want in (((), 30), (("--set", "holdout_fraction=0.4"), 50)):
        one = tmp_path / f"q{want}.plada"
        code, sent, err = run(capsys, *args1, "--set", "deciders=1", "-o", str(one),
                              "--set", r"holdout_groups=^\d(\d)", *extra)
        assert code == 0, err
        (groups, [(fit, held)]) = seen[-1]
        assert len(held) == want and not set(groups[fit]) & set(groups[held])
        assert sent["auto"]["heldout_images"] == want
    # the default, two deciders: the first slice is the one-teacher slice (its teacher is shared), the second
    # another 20% of whole groups, disjoint from it
    code, sent, err = run(capsys, *args1, "-o", str(tmp_path / "two.plada"), "--set", r"holdout_groups=^\d(\d)")
    assert code == 0, err
    groups, [(fit0, held0), (fit1, held1)] = seen[-1]
    assert len(held0) == 30 and 10 <= len(held1) <= 30 and not set(groups[held0]) & set(groups[held1])
    assert not set(groups[fit1]) & set(groups[held1])
    code, _, err = run(capsys, *args1, "-o", str(tmp_path / "bad.plada"), "--set", "holdout_fraction=1")
    assert code == 2 and one_line(err) and "holdout_fraction must be" in err


def test_cached_teacher_gets_its_test_accuracy_once(tiny_data: Path, cache: Path) -> None:
    """A fold teacher trained without a test split is measured on test later without being retrained."""
    from plada.data import load_source
    from plada.teacher import TeacherConfig, train_teacher

    src = load_source("tinytarget", tiny_data, progress=False)
    train, test = src.split("train"), src.split("test")
    cfg = TeacherConfig(res=32, epochs=1)
    _, info = train_teacher(train, None, cfg, cache / "teachers", progress=False)
    assert "test_accuracy" not in info
    _, again = train_teacher(train, test, cfg, cache / "teachers", progress=False)
    assert 0 <= again["test_accuracy"] <= 1 and again["train_seconds"] == info["train_seconds"]
    _, stored = train_teacher(train, None, cfg, cache / "teachers", progress=False)
    assert stored["test_accuracy"] == again["test_accuracy"]  # kept with the teacher
