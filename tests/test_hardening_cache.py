"""Hardening of the caches (issue 20): stale entries after an edit, silent loss in decoding, torn files.

Each test reproduces one probe of the issue: an edit the old cache keys could not see (images moved
between classes, a same-size file with its mtime restored, pixels changed under the same split name,
another backbone of the same name), a decode that lost images or pixels without a word, or a cache
entry torn by a crash that the old code tripped over on every later run.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _image, one_line, run, write_archive
from PIL import Image

from plada import backbones, teacher
from plada import data as D
from plada.data import atomic_write, load_source
from plada.errors import PladaError
from plada.features import cached_features, rows_features
from plada.pool import build_pool
from plada.teacher import TeacherConfig, train_teacher
from plada.train import predict

TINY = TeacherConfig(model="small-cnn", res=16, epochs=0.01, batch_size=16)  # one real step: fast
SRC = str(Path(__file__).resolve().parents[1] / "src")


def target_files(seed: int = 0, n: int = 40) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {f"train/{c}/{i:03d}.png": _image(rng, base)
            for c, base in (("blue", (30, 40, 200)), ("green", (30, 180, 40)), ("red", (200, 30, 30)))
            for i in range(n)}


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, raw in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(raw)
    return root


def bmp(value: int, size: int = 8) -> bytes:
    """An uncompressed image: every one of a given size has the same byte count, whatever its pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buf, format="BMP")
    return buf.getvalue()


@pytest.fixture()
def fits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts real teacher fine-tunes (training itself unchanged)."""
    calls: list[int] = []
    real = teacher.fit

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(teacher, "fit", counted)
    return calls


# --- finding 1: stale teacher, features ---------------------------------------------------------------------


def test_teacher_retrained_when_images_move_between_classes(tmp_path: Path, cache: Path, fits: list[int]) -> None:
    """Images 24-39 swapped between two classes: counts, label sum and the first 64 images all unchanged."""
    files = target_files()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_source(str(write_archive(tmp_path / "a" / "swap.tar", "swap", files)), progress=False).split("train")
    moved = dict(files)
    for i in range(24, 40):
        moved[f"train/green/{i:03d}.png"], moved[f"train/red/{i:03d}.png"] = (files[f"train/red/{i:03d}.png"],
                                                                            files[f"train/green/{i:03d}.png"])
    b = load_source(str(write_archive(tmp_path / "b" / "swap.tar", "swap", moved)), progress=False).split("train")
    assert len(a) == len(b) and a.labels.sum() == b.labels.sum()
    assert int(a.images[:64].sum()) == int(b.images[:64].sum())  # what the old key looked at
    teachers = cache / "teachers"
    train_teacher(a, None, TINY, teachers, progress=False)
    train_teacher(a, None, TINY, teachers, progress=False)
    assert len(fits) == 1  # the same target still reuses its teacher
    train_teacher(b, None, TINY, teachers, progress=False)
    assert len(fits) == 2 and len(list(teachers.iterdir())) == 2


def test_rows_features_follow_the_rows_content(cache: Path) -> None:
    """The caller's prefix (dataset/split/size/what) is the same after an in-place edit of the images."""
    torch.manual_seed(0)
    fm = backbones.create("small-cnn", 1, 32, pretrained=False).eval()
    rng = np.random.default_rng(0)
    before = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    after = before.copy()
    after[2] = 255 - after[2]  # a row in idx
    idx = np.arange(0, 12, 2)
    f1 = rows_features(fm, before, idx, "ds/train/12/held", progress=False)
    f2 = rows_features(fm, after, idx, "ds/train/12/held", progress=False)
    want = predict(fm, after[idx], features=True, progress=False)
    np.testing.assert_allclose(f2, want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(f1[1], f2[1])


def test_cached_features_keyed_by_weights(cache: Path) -> None:
    images = np.random.default_rng(1).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(backbones.create("small-cnn", 1, 32, pretrained=False).eval())
    f0 = np.asarray(cached_features(models[0], images, "pool/abc", progress=False))
    f1 = np.asarray(cached_features(models[1], images, "pool/abc", progress=False))
    np.testing.assert_allclose(f1, predict(models[1], images, features=True, progress=False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(f0, f1)
    torch.manual_seed(0)
    fresh_head = backbones.create("small-cnn", 1, 32, pretrained=False).eval()
    torch.nn.init.normal_(fresh_head.head.weight)  # like `feature_model`'s head, unseeded in every process
    assert len(list((cache / "features").iterdir())) == 2
    np.testing.assert_array_equal(np.asarray(cached_features(fresh_head, images, "pool/abc", progress=False)), f0)
    assert len(list((cache / "features").iterdir())) == 2  # the head plays no part in features: a hit


# --- finding 2: folders keyed by content --------------------------------------------------------------------


def test_folder_edit_keeping_size_and_mtime_is_seen(tmp_path: Path, cache: Path) -> None:
    """`cp` of a same-sized image then `touch -r`: new pixels, new hashes, new pool fingerprint."""
    src = write_folder(tmp_path / "bmps", {f"train/c{c}/{i}.bmp": bmp(10 * i + c) for c in range(2) for i in range(4)})
    first = load_source(str(src), progress=False)
    fp1 = build_pool([str(src)], name="bmps", progress=False).fingerprint
    target = src / "train/c1/2.bmp"
    st = target.stat()
    target.write_bytes(bmp(200))
    assert target.stat().st_size == st.st_size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = load_source(str(src), progress=False)
    row = second.paths.index("train/c1/2.bmp")
    assert int(second.images[row].min()) == 200 and second.hashes[row] != first.hashes[row]
    assert second.root != first.root
    assert build_pool([str(src)], name="bmps", progress=False).fingerprint != fp1


# --- finding 5: silent loss in decoding ---------------------------------------------------------------------


def test_unreadable_class_folder_is_an_error(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_folder(tmp_path / "three", target_files(n=3))
    real = os.scandir

    def scandir(path=".", *a):  # root reads through chmod 000, so the refusal is simulated
        if os.fspath(path).endswith(os.path.join("train", "green")):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path, *a)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PladaError, match="green"):
        load_source(str(src), progress=False)
    code, _, err = run(capsys, "pool", "build", str(src))
    assert code == 2 and one_line(err) and "train/green" in err and "Permission denied" in err


def test_16bit_greyscale_scaled_not_saturated(tmp_path: Path, cache: Path) -> None:
    files = {}
    for i, v in enumerate((0, 257 * 64, 257 * 128, 65535)):
        buf = io.BytesIO()
        Image.fromarray(np.full((16, 16), v, np.uint16)).save(buf, format="PNG")  # mode I;16
        files[f"train/g/{i}.png"] = buf.getvalue()
    src = load_source(str(write_archive(tmp_path / "deep.tar", "deep", files)), progress=False)
    assert [int(src.images[i, 0, 0, 0]) for i in range(4)] == [0, 64, 128, 255]
    assert (src.images == src.images[:, :1, :1, :1]).all()  # grey: every channel and pixel alike


def test_non_utf8_file_name_refused_by_name(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture) -> None:
    src = write_folder(tmp_path / "names", target_files(n=2))
    with open(os.path.join(os.fsencode(src), b"notes-\xff.txt"), "wb") as f:  # not an image: ignored, as before
        f.write(b"hi")
    assert len(load_source(str(src), progress=False).paths) == 6
    with open(os.path.join(os.fsencode(src / "train" / "red"), b"caf\xe9.png"), "wb") as f:
        f.write(target_files(n=1)["train/red/000.png"])
    with pytest.raises(PladaError, match=r"caf\\xe9\.png"):
        load_source(str(src), progress=False)
    code, _, err = run(capsys, "pool", "build", str(src))
    assert code == 2 and one_line(err) and "not valid UTF-8" in err


def test_image_read_error_names_the_file(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A symlink to a dying device: open works, read fails with EIO. It is skipped and named, not fatal."""
    src = write_folder(tmp_path / "eio", target_files(n=3))

    class Dying(io.RawIOBase):
        def read(self, *a):
            raise OSError(errno.EIO, "Input/output error")

        readall = read

    def fake_open(path, mode="r", *a, **k):
        if os.fspath(path).endswith(os.path.join("green", "001.png")):
            return Dying()
        return builtins.open(path, mode, *a, **k)

    monkeypatch.setattr(D, "open", fake_open, raising=False)
    s = load_source(str(src), progress=False)
    assert s.skipped == ["train/green/001.png"] and len(s.paths) == 8
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and "train/green/001.png" in err and one_line(err)


# --- finding 6: torn cache entries are rebuilt --------------------------------------------------------------


def _teacher_dir(cache: Path) -> Path:
    (d,) = (cache / "teachers").iterdir()
    return d


@pytest.mark.parametrize("damage", [
    ("teacher.safetensors", b""),
    ("teacher.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage"),
    ("teacher.json", b"\x00\xffnot json"),
    ("teacher.json", b"[1, 2]"),
], ids=["empty-weights", "garbage-weights", "garbage-info", "wrong-info"])
def test_torn_teacher_is_retrained(damage: tuple[str, bytes], tmp_path: Path, cache: Path, fits: list[int]) -> None:
    train = load_source(str(write_archive(tmp_path / "t.tar", "t", target_files(n=10))), progress=False).split("train")
    model, _ = train_teacher(train, None, TINY, cache / "teachers", progress=False)
    name, raw = damage
    (_teacher_dir(cache) / name).write_bytes(raw)
    again, info = train_teacher(train, None, TINY, cache / "teachers", progress=False)
    assert len(fits) == 2 and info["train_images"] == len(train)
    reloaded, _ = train_teacher(train, None, TINY, cache / "teachers", progress=False)  # healed: loaded now
    assert len(fits) == 2
    for k, v in again.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


@pytest.mark.parametrize("damage", ["meta-truncated", "meta-empty", "images-truncated", "images-empty"])
def test_torn_source_cache_is_rebuilt(damage: str, tmp_path: Path, cache: Path) -> None:
    src = write_archive(tmp_path / "s.tar", "s", target_files(n=4))
    good = load_source(str(src), progress=False)
    want_npy, want_meta = (good.root / "images.npy").read_bytes(), (good.root / "meta.json").read_bytes()
    name = "meta.json" if damage.startswith("meta") else "images.npy"
    raw = (good.root / name).read_bytes()
    (good.root / name).write_bytes(b"" if damage.endswith("empty") else raw[: len(raw) // 2])
    del good
    s = load_source(str(src), progress=False)
    assert len(s.paths) == 12 and s.images.shape[0] == 12
    assert (s.root / "images.npy").read_bytes() == want_npy and (s.root / "meta.json").read_bytes() == want_meta


def test_torn_features_recomputed(cache: Path) -> None:
    torch.manual_seed(0)
    fm = backbones.create("small-cnn", 1, 32, pretrained=False).eval()
    images = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    want = np.asarray(cached_features(fm, images, "k", progress=False)).copy()
    (path,) = (cache / "features").glob("*.npy")
    path.write_bytes(path.read_bytes()[:100])
    np.testing.assert_array_equal(np.asarray(cached_features(fm, images, "k", progress=False)), want)


def _killed_mid_write(script: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", script], cwd=cwd, env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()


def test_killed_atomic_write_leftover_swept(tmp_path: Path) -> None:
    _killed_mid_write(
        "import os, signal\n"
        "from plada.data import atomic_write\n"
        "atomic_write('out.bin', lambda f: (f.write(b'half'), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))\n",
        tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the kill left no temp file"
    live = tmp_path / f".other.bin.{os.getpid()}.0123abcd.tmp"  # a writer still running: kept
    foreign = tmp_path / ".other.bin.1@ffffffff.0123abcd.tmp"  # another machine's: its pid means nothing here
    live.write_bytes(b"x")
    if getattr(D, "_HOST", None) != "ffffffff":
        foreign.write_bytes(b"x")
    atomic_write(tmp_path / "out.bin", b"whole")
    assert (tmp_path / "out.bin").read_bytes() == b"whole"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp"))
    assert left == sorted(p.name for p in (live, foreign) if p.exists())


def test_killed_source_build_leftover_swept(tmp_path: Path, cache: Path) -> None:
    """SIGKILL while `images.npy` is being written, then a normal run: a whole cache and no temp file."""
    src = write_archive(tmp_path / "k.tar", "k", target_files(n=4))
    _killed_mid_write(
        "import os, signal\n"
        "import plada.data as D\n"
        "real = D.atomic_write\n"
        "def aw(path, data):\n"
        "    if str(path).endswith('images.npy'):\n"
        "        return real(path, lambda f: (f.write(b'partial'), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))\n"
        "    return real(path, data)\n"
        "D.atomic_write = aw\n"
        f"D.load_source({str(src)!r}, progress=False)\n",
        tmp_path)
    assert any(p.name.endswith(".tmp") for p in (cache / "datasets").rglob("*"))
    s = load_source(str(src), progress=False)
    assert len(s.paths) == 12
    assert sorted(p.name for p in s.root.iterdir()) == ["images.npy", "meta.json"]


@pytest.mark.parametrize("damage", [b"", b"{not json", b"[1, 2]"])
def test_damaged_pool_json_is_one_line(damage: bytes, tiny_data: Path, cache: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    """An empty or garbage pool.json: one line naming the pool and the repair, no traceback."""
    from conftest import one_line, run

    code, _, err = run(capsys, "pool", "build", "tinypool", "--data", str(tiny_data))
    assert code == 0, err
    meta = cache / "pools" / "tinypool" / "pool.json"
    meta.resolve().write_bytes(damage)
    code, _, err = run(capsys, "pool", "export", "tinypool", "-o", str(cache.parent / "m.tsv"))
    assert code == 2 and one_line(err) and "pool.json" in err and "plada pool build" in err, err


def test_teacher_epochs_follow_the_train_size_and_share_the_explicit_cache(tmp_path: Path, cache: Path,
                                                                         fits: list[int],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """No epochs set: TEACHER_SAMPLES images seen, within TEACHER_EPOCHS; the resolved teacher is the cache entry
    of the same recipe asked for explicitly (and the other way round), so no cached teacher is orphaned."""
    from plada import config

    t = TeacherConfig()
    assert t.epochs is None and t.for_train(50_000).epochs == 2.0 and t.for_train(25_000).epochs == 2.0
    assert t.for_train(3430).epochs == round(config.TEACHER_SAMPLES / 3430, 2) and 2 < t.for_train(3430).epochs < 30
    assert t.for_train(10).epochs == 30.0 and TeacherConfig(epochs=3.0).for_train(10).epochs == 3.0
    train = load_source(str(write_archive(tmp_path / "t.tar", "t", target_files())), progress=False).split("train")
    monkeypatch.setattr(config, "TEACHER_SAMPLES", len(train))  # one epoch's worth: the 2-epoch floor acts
    auto = TeacherConfig(model="small-cnn", res=16, batch_size=16)
    _, info = train_teacher(train, None, auto, cache / "teachers", progress=False)
    assert info["config"]["epochs"] == 2.0 and len(fits) == 1
    train_teacher(train, None, TeacherConfig(model="small-cnn", res=16, batch_size=16, epochs=2.0), cache / "teachers",
                  progress=False)
    assert len(fits) == 1
    monkeypatch.setattr(config, "TEACHER_SAMPLES", 10 * len(train))  # 10 epochs: another recipe, another teacher
    _, info = train_teacher(train, None, auto, cache / "teachers", progress=False)
    assert info["config"]["epochs"] == 10.0 and len(fits) == 2


def test_teacher_mode_auto_picks_the_better_recipe_on_held_out_train_rows(tmp_path: Path, cache: Path,
                                                                          fits: list[int]) -> None:
    """Both recipes train on the same 80% and are scored on the rest; the winner is its own recipe's cached
    teacher on all of train (asking for that recipe afterwards trains nothing); a tie keeps the fine-tune."""
    train = load_source(str(write_archive(tmp_path / "t.tar", "t", target_files())), progress=False).split("train")
    cfg = TeacherConfig(model="small-cnn", res=16, epochs=2.0, batch_size=16, mode="auto")
    model, info = train_teacher(train, None, cfg, cache / "teachers", progress=False)
    rec = info["recipe"]
    scores = rec["validation"]
    assert set(scores) == {"finetune", "linear"} and rec["held_out"] == round(0.2 * len(train))
    assert rec["chosen"] == ("linear" if scores["linear"] > scores["finetune"] else "finetune")
    assert info["config"]["mode"] == rec["chosen"] and info["train_images"] == len(train)
    n = len(fits)
    assert n == 1 + (rec["chosen"] == "finetune")  # the 80% fine-tune, and the full one if it won
    again, _ = train_teacher(train, None, TeacherConfig(model="small-cnn", res=16, epochs=2.0, batch_size=16,
                                                        mode=rec["chosen"]), cache / "teachers", progress=False)
    assert len(fits) == n
    x = np.asarray(train.images[:8])
    assert np.array_equal(predict(model, x, progress=False), predict(again, x, progress=False))
