"""Every option of `plada send` acts or is refused: none is silently ignored (issue 17)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from conftest import one_line, run

from plada import config, payload
from plada.cli import MOVED, build_parser, main

BASE = ["--set", "teacher.res=32", "--set", "teacher.epochs=1"]


def send_options() -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[-1 if a.option_strings[0] == "-o" else 0] for a in sub.choices["send"]._actions
            if a.option_strings and a.dest != "help"}


def test_send_help_has_at_most_twelve_options() -> None:
    opts = send_options()
    assert len(opts) <= 12, sorted(opts)
    assert {"--budget", "--keep", "--set", "--seed", "--pool"} <= opts


# Each option with a value that is not its default, and the JSON field of the run that must change with it.
CHANGES = {
    "--keep": (["--keep", "20%"], "kept"),
    "--policy": (["--policy", "highest-energy"], "indices"),
    "--teacher": (["--teacher", "small-cnn"], "teacher"),
    "--seed": (["--seed", "1", "--policy", "random"], "indices"),
    "--budget": (["--budget", "1KB", "--set", "receiver=plain"], "auto"),
    "--set": (["--set", "count=7"], "kept"),
}


@pytest.mark.slow
def test_every_send_option_changes_the_output_or_is_refused(tiny_data: Path, cache: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    common = ["send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), *BASE]
    code, base, err = run(capsys, *common, "-o", str(tmp_path / "base.plada"))
    assert code == 0, err
    base_p = payload.read(tmp_path / "base.plada")
    # --out/--pool/--data name the run's files; --engine is proven payload-neutral by test_scale's Ray test;
    # --device: a CPU-only machine has one device, and test_device proves --device cpu byte-identical to auto
    # --weights: test_weights_flag_is_the_weights_setting (and the timm tests load a local weights file with it)
    untested = {"--out", "--pool", "--data", "--engine", "--device", "--weights"}
    assert set(CHANGES) | untested == send_options()
    for opt, (argv, field) in CHANGES.items():
        out = tmp_path / f"{opt.strip('-')}.plada"
        code, got, err = run(capsys, *common, *argv, "-o", str(out))
        assert code == 0, (opt, err)
        p = payload.read(out)
        if field == "indices":
            assert p.indices.tolist() != base_p.indices.tolist(), opt
        elif field == "teacher":
            assert got["selection"]["teacher"]["model"] == "small-cnn" != base["selection"]["teacher"]["model"]
        elif field == "auto":
            assert p.forecast is not None and base_p.forecast is None and "auto" in got and "auto" not in base
        else:
            assert got[field] != base[field], opt


@pytest.mark.parametrize("argv, message", [
    (["--budget", "1KB", "--set", "receiver=plain", "--keep", "5%"], "auto policy chooses keep"),
    (["--budget", "1KB", "--set", "receiver=plain", "--set", "safety_share=0.2"], "chooses safety_share"),
    (["--budget", "1KB", "--policy", "random"], "cannot be combined"),
    (["--budget", "1KB"], "teacher do not act; drop them, or add --set receiver=plain"),
    (["--set", "deciders=2"], "only act under the auto policy"),
    (["--set", "actors=2"], "only act with engine ray"),
    (["--keep", "5%", "--set", "count=3"], "not both"),
    (["--set", "teacher.epochs=nan"], "teacher.epochs must be a finite number"),
    (["--set", "teacher.epochs=inf"], "teacher.epochs must be a finite number"),
    (["--set", "teacher.epochs=-1"], "teacher.epochs must be"),
    (["--set", "teacher.limit=0"], "teacher.limit must be an integer >= 1"),
    (["--set", "teacher.limit=-5"], "teacher.limit must be"),
    (["--set", "temperature=nan"], "temperature must be"),
    (["--set", "temperature=inf"], "temperature must be"),
    (["--set", "temperature=0"], "temperature must be"),
    (["--seed", "-1"], "not a seed"),
    (["--seed", str(2**70)], "not a seed"),
    (["--set", "nosuch=1"], "unknown setting 'nosuch'"),
    (["--set", "teacher.res"], "takes key=value"),
    (["--set", "teacher.res=big"], "teacher.res takes int"),
    (["--teacher", "resnet999"], "unknown teacher.model"),
    (["--budget", "10", "--set", "receiver=plain"], "too small"),
    (["--teacher-epochs", "2"], "--set teacher.epochs"),
    (["--holdout-folds", "3"], "was removed"),
])
def test_bad_arguments_refused_before_any_work(argv: list[str], message: str, tiny_data: Path, cache: Path,
                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Each refused in one line before a teacher trains (no teacher cache is ever written)."""
    out = tmp_path / "x.plada"
    try:
        code = main(["--json", "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), *BASE, *argv,
                     "-o", str(out)])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and one_line(err), err
    assert not out.exists() and not (cache / "teachers").exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: __import__("os").mkfifo(p), "not a regular file"),
    (lambda p: p.write_bytes(b"somebody's data"), "not a file plada wrote"),
])
def test_output_path_checked_first(make, message: str, tiny_data: Path, cache: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out.plada"
    make(out)
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), *BASE,
                       "-o", str(out))
    assert code == 2 and message in err and one_line(err), err
    assert not (cache / "teachers").exists()


def test_outputs_never_overwrite_inputs(tiny_data: Path, cache: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    """`send -o` onto the target or pool source archive, or the pool manifest; `receive --model-out` onto the
    payload: refused, the input intact."""
    common = ["send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), *BASE]
    code, _, err = run(capsys, *common, "-o", str(tmp_path / "ok.plada"))
    assert code == 0, err
    manifest = cache / "pools" / "tinypool" / "manifest.tsv"
    for victim in (tiny_data / "tinypool.tar", tiny_data / "tinytarget.tar", manifest):
        before = victim.read_bytes()
        code, _, err = run(capsys, *common, "-o", str(victim))
        assert code == 2 and one_line(err), (victim, err)
        assert victim.read_bytes() == before
    pay = tmp_path / "ok.plada"
    before = pay.read_bytes()
    code, _, err = run(capsys, "receive", str(pay), "--pool", "tinypool", "--data", str(tiny_data),
                       "--model-out", str(pay))
    assert code == 2 and one_line(err) and pay.read_bytes() == before, err


def test_every_moved_flag_names_its_new_spelling(capsys: pytest.CaptureFixture) -> None:
    send_keys = set(config.keys(config.SendConfig())) | set(config.keys(config.ReceiveConfig()))
    for flag, new in MOVED.items():
        assert main(["send", "t", "-o", "x.plada", flag, "1"]) == 2
        err = capsys.readouterr().err
        assert one_line(err) and flag in err
        if new is not None:  # the key it names exists
            key = new.split()[1].split("=")[0]
            assert key in send_keys, (flag, key)


def test_config_models_match_the_registry() -> None:
    from plada.backbones import REGISTRY

    assert set(config.MODELS) == set(REGISTRY)


def test_inputs_that_would_hang_or_sprawl_are_one_line(tiny_data: Path, cache: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A FIFO as the payload to read, a target that is not an archive, a name holding a line break."""
    import os

    fifo = tmp_path / "f.plada"
    os.mkfifo(fifo)
    for argv in (["inspect", str(fifo)], ["receive", str(fifo), "--pool", "tinypool", "--data", str(tiny_data)]):
        code, _, err = run(capsys, *argv)  # would block forever in open() before
        assert code == 2 and one_line(err) and "not a regular file" in err, err
    bad = tmp_path / "bad.tar"
    bad.write_text("not an archive")
    code, _, err = run(capsys, "send", str(bad), "--pool", "tinypool", "--data", str(tiny_data), *BASE,
                       "-o", str(tmp_path / "x.plada"))
    assert code == 2 and one_line(err) and "not a tar archive" in err, err
    code, _, err = run(capsys, "send", "bad\nname", "--pool", "tinypool", "--data", str(tiny_data), *BASE,
                       "-o", str(tmp_path / "x.plada"))
    assert code == 2 and one_line(err), err


def test_weights_flag_is_the_weights_setting(tiny_data: Path, cache: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """`--weights FILE` is the teacher's weights on send and score, the student's on receive; a missing file is
    one line before any work."""
    from plada.cli import _receive_cfg, _send_cfg

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"x")
    parser = build_parser()
    for verb in ("send", "score"):
        a = parser.parse_args([verb, "tinytarget", "--weights", str(f), *(["-o", "t.plada"] if verb == "send" else [])])
        assert _send_cfg(a).teacher.weights == str(f) and config.SendConfig().teacher.weights is None
    a = parser.parse_args(["receive", "t.plada", "--weights", str(f)])
    assert _receive_cfg(a).student.weights == str(f)
    code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                       "-o", str(tmp_path / "t.plada"), "--weights", str(tmp_path / "absent.pt"))
    assert code == 2 and one_line(err) and "absent.pt" in err and not (tmp_path / "t.plada").exists()


def test_proxy_refused_where_nothing_is_forecast(tiny_data: Path, cache: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """The proxy backbone forecasts the auto search, a head or several receiver modes: with a fixed policy and one
    receiver mode it would be silently ignored, so it is refused before any work."""
    out = tmp_path / "t.plada"
    for opt in ("proxy=small-cnn", "proxy_res=32"):
        code, _, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
                           "-o", str(out), "--set", opt)
        assert code == 2 and one_line(err) and opt.split("=")[0] in err and not out.exists()
    config.SendConfig(proxy_res=32, receiver="auto").check()  # forecast there: acts
    config.SendConfig(proxy_res=32, budget=1000).check()  # the head's features: acts
