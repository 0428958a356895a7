"""Tiny synthetic ImageFolder archives, so the end-to-end tests run in seconds without real data."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from plada.cli import main

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 40, 200)}


def _image(rng: np.random.Generator, base: tuple[int, int, int], size: int = 32) -> bytes:
    arr = np.clip(np.array(base)[None, None] + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_archive(path: Path, name: str, files: dict[str, bytes]) -> Path:
    """An ImageFolder `.tar` holding `name/<relpath>` for each file."""
    with tarfile.open(path, "w") as tar:
        for rel, raw in files.items():
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with `tinypool` (3 folders of colour-ish images + noise) and `tinytarget` (3 colours)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pool = {}
    for g, base in enumerate([(180, 60, 60), (60, 160, 60), (60, 60, 180), (120, 120, 120)]):
        for i in range(80):
            pool[f"train/folder{g}/img{i:03d}.png"] = _image(rng, base)
    write_archive(root / "tinypool.tar", "tinypool", pool)
    target = {}
    for split, n in (("train", 40), ("test", 20)):
        for cname, base in COLOURS.items():
            for i in range(n):
                target[f"{split}/{cname}/{i:03d}.png"] = _image(rng, base)
    write_archive(root / "tinytarget.tar", "tinytarget", target)
    return root


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("PLADA_CACHE", str(d))
    return d


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, dict | None, str]:
    """The real CLI in-process with --json: (exit code, parsed output, stderr)."""
    code = main(["--json", *argv])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def one_line(err: str) -> bool:
    """A user mistake must read as one line, never a traceback."""
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.fixture()
def fold_split_calls(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every `auto.fold_split` call made during the test, as (groups, its result)."""
    from plada import auto

    seen: list = []
    real = auto.fold_split

    def spy(n, folds, seed=0, groups=None, frac=None):
        seen.append((groups, real(n, folds, seed, groups, frac=frac)))
        return seen[-1][1]

    monkeypatch.setattr(auto, "fold_split", spy)
    return seen
