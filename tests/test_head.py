"""Receiver mode head: a linear head in the pool's PCA space, the payload's `head` section (plada.head, FORMAT.md)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import zstandard as zstd
from conftest import one_line, run

from plada import head as headmod
from plada import payload as P
from plada import receiver
from plada.errors import PayloadError

FP = "ab" * 32


def _head(bits: int, classes: int = 3, dim: int = 7, seed: int = 0) -> P.Head:
    top = 2 ** (bits - 1) - 1
    rng = np.random.default_rng(seed)
    return P.Head("efficientnet-lite0", 64, bits, rng.integers(-top, top + 1, (classes, dim)),
                  rng.uniform(0.01, 0.1, classes), rng.normal(0, 1, classes))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("count", [0, 5])
def test_head_round_trip_in_format_1_0(bits: int, count: int) -> None:
    p = P.Payload(FP, 100, ("a", "b", "c"), np.arange(count) * 7, np.arange(count) % 3, forecast=0.6,
                  receiver="head", head=_head(bits))
    data = P.encode(p)
    assert data[8:10] == b"\x00\x01"  # one format, 1.0: the header's receiver and section list say "head"
    q = P.decode(data)
    assert q == p and q.head.dim == 7 and q.head.bits == bits
    info = P.describe(data)
    assert info["head"] == {"backbone": "efficientnet-lite0", "res": 64, "dim": 7, "bits": bits}
    assert [s["name"] for s in info["sections"]][-1] == "head"
    w, b = q.head.dequantised()
    assert w.dtype == np.float32 and np.allclose(w, p.head.weights * p.head.scales.astype(np.float32)[:, None])


def test_payloads_without_a_head_have_no_head_key() -> None:
    data = P.encode(P.Payload(FP, 100, ("a", "b"), np.arange(5), np.arange(5) % 2))
    assert data[8:10] == b"\x00\x01"
    assert "head" not in P.peek_header(data)


def test_pre_release_head_files_are_refused_in_one_line() -> None:
    """plada 0.x wrote head payloads with version bytes 01 01 ("1.1"); 1.0 names them, as it names the drafts."""
    data = P.encode(P.Payload(FP, 100, ("a", "b", "c"), np.arange(0), np.arange(0), receiver="head", head=_head(8)))
    old = _rewrite(data, lambda h: 0x0101)
    for call in (P.decode, P.peek_header, P.describe):
        with pytest.raises(PayloadError) as e:
            call(old)
        assert str(e.value) == ("payload is in plada 0.x's pre-release format 1.1 (a head payload); this plada "
                                "reads format 1.0 (ask its sender to send it again)")


def _rewrite(data: bytes, edit) -> bytes:
    """Re-pack a payload with its header JSON (and version) edited, checksum fixed: only the field is wrong."""
    _, version, hlen = struct.unpack_from("<8sHI", data)
    header = json.loads(zstd.ZstdDecompressor(dict_data=P._HEADER_ZDICT).decompress(data[14:14 + hlen]))
    version = edit(header) or version
    packed = P._compress_header(P._dumps(header).encode(), 19)
    body = struct.pack("<8sHI", P.MAGIC, version, len(packed)) + packed + data[14 + hlen:-32]
    import hashlib

    return body + hashlib.sha256(body).digest()


def test_inconsistent_head_headers_are_refused() -> None:
    data = P.encode(P.Payload(FP, 100, ("a", "b", "c"), np.arange(3), np.arange(3), receiver="head", head=_head(8)))
    plain = P.encode(P.Payload(FP, 100, ("a", "b", "c"), np.arange(3), np.arange(3)))
    cases = {
        "receiver head without a head key": lambda h: h.pop("head") and None,
        "other receiver": lambda h: h.update(receiver="plain"),
        "bits 5": lambda h: h["head"].update(bits=5),
        "dim beyond the section": lambda h: h["head"].update(dim=8),
        "head section but no head key": lambda h: h.pop("head") and h.update(receiver="plain"),
    }
    for what, edit in cases.items():
        with pytest.raises(PayloadError) as e:
            P.decode(_rewrite(data, edit))
        assert "\n" not in str(e.value), what
    with pytest.raises(PayloadError, match=r"missing \['head'\]"):
        P.decode(_rewrite(plain, lambda h: h.update(receiver="head")))
    with pytest.raises(PayloadError):
        P.Payload(FP, 100, ("a", "b", "c"), np.arange(3), np.arange(3), receiver="head")  # mode without head
    with pytest.raises(PayloadError):
        P.Payload(FP, 100, ("a", "b"), np.arange(3), np.arange(3) % 2, receiver="head", head=_head(8))  # 3 rows


def test_head_section_values_are_bounds_checked() -> None:
    h = _head(4, classes=3, dim=3)  # 9 weights: an odd count, so one padding nibble
    p = P.Payload(FP, 100, ("a", "b", "c"), np.arange(0), np.arange(0), receiver="head", head=h)
    raw = P._head_raw(h)
    for bad in (bytes([raw[0] | 0x0F]) + raw[1:],  # nibble 15
                raw[:4] + bytes([raw[4] | 0xF0]) + raw[5:],  # the padding nibble set
                raw[:5] + np.array([-1.0], "<f2").tobytes() + raw[7:]):  # a negative scale
        blob = P._compress(bad, 19)
        good = P.encode(p)
        sec = P.peek_header(good)["sections"][-1]
        data = _rewrite(good[:-32 - sec["length"]] + blob + good[-32:],
                        lambda hd, n=len(blob): hd["sections"][-1].update(length=n))  # noqa: B008
        with pytest.raises(PayloadError):
            P.decode(data)
    with pytest.raises(PayloadError):
        P.Head("efficientnet-lite0", 64, 4, np.full((2, 2), 8), np.ones(2), np.zeros(2))  # |w| > 7


def test_basis_is_deterministic_whitened_and_sign_fixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLADA_CACHE", str(tmp_path))
    feats = np.random.default_rng(0).normal(size=(500, 16)).astype(np.float32) * np.linspace(3, 0.5, 16)
    a = headmod.basis(feats, "k")
    b = headmod.basis(feats, "k")  # served from the cache
    c = headmod.basis(feats)
    for x, y in ((a, b), (a, c)):
        assert np.array_equal(x.components, y.components) and np.array_equal(x.spread, y.spread)
    z = a.project(feats, 8)
    assert np.allclose(z.std(0), 1, atol=0.05) and np.allclose(z.mean(0), 0, atol=0.05)
    top = np.abs(a.components).argmax(0)
    assert (a.components[top, np.arange(16)] > 0).all()
    # the whitened space does not depend on the features' overall scale (they are L2-normalised first)
    assert np.allclose(headmod.basis(feats * 3).project(feats * 3, 8), z, atol=1e-3)


def test_choose_respects_the_budget_and_prefers_accuracy() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 64)) * 2
    y = np.repeat(np.arange(4), 100)
    x = (centres[y] + rng.normal(size=(400, 64))).astype(np.float32)
    pca = headmod.basis(x)

    def size_of(h: P.Head) -> int:
        return len(P.encode(P.Payload(FP, 400, tuple("abcd"), np.arange(0), np.arange(0), forecast=0.1234,
                                      receiver="head", head=h)))

    free = headmod.choose(x, y, 4, pca, "efficientnet-lite0", 64, size_of, None)
    best = max(c["holdout_accuracy"] for c in free.grid)
    assert free.forecast == best > 0.9  # no budget: the most accurate cell on held-out rows
    smallest = min(c["bytes"] for c in free.grid)
    tight = headmod.choose(x, y, 4, pca, "efficientnet-lite0", 64, size_of, smallest + 2)
    assert size_of(tight.head) <= smallest + 2 and tight.head.dim == 16
    with pytest.raises(Exception, match="cannot hold a head"):
        headmod.choose(x, y, 4, pca, "efficientnet-lite0", 64, size_of, smallest - 20)


def test_send_and_receive_a_head(tiny_data: Path, cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "h.plada"
    base = ("send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "--budget", "600")
    code, sent, err = run(capsys, *base, "-o", str(out))  # under a budget the default payload is a head
    assert code == 0, err
    assert sent["kept"] == 0 and sent["receiver"] == "head" and sent["payload_bytes"] <= 600
    assert sent["payload_bytes"] == out.stat().st_size and 0 < sent["forecast_accuracy"] <= 1
    code, sent2, err = run(capsys, *base, "--set", "receiver=head", "-o", str(tmp_path / "h2.plada"))
    assert code == 0 and (tmp_path / "h2.plada").read_bytes() == out.read_bytes()  # deterministic, the same mode
    code, info, err = run(capsys, "inspect", str(out))
    assert code == 0 and info["format"] == "1.0" and info["head"]["dim"] == sent["head"]["dim"]

    recv = ("receive", str(out), "--pool", "tinypool", "--data", str(tiny_data), "--test", "tinytarget")
    code, rec, err = run(capsys, *recv)  # no student mode asked for: a head payload gets the linear student
    assert code == 0, err
    assert rec["student"]["mode"] == "linear"
    assert rec["receiver"]["mode"] == "head" and rec["receiver"]["payload"] == 0
    assert rec["receiver"]["pseudo"] == 320  # the whole pool (receiver.HEAD_SHARE 1.0), labelled by the head
    # three colours, chance 1/3, and no labelled image was sent at all: the pool's tints differ from the target's,
    # so the pool images the head labels are an imperfect stand-in (0.75 when written)
    assert rec["student_accuracy"] > 0.6
    code, rec2, err = run(capsys, *recv, "--student-mode", "linear")
    assert rec2["student_accuracy"] == rec["student_accuracy"]
    code, _, err = run(capsys, *recv, "--receiver", "plain")  # labels only: this payload has none
    assert code == 2 and one_line(err) and "--receiver head" in err


def test_head_refusals_are_one_line(tiny_data: Path, cache: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    base = ("send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "-o", str(tmp_path / "x.plada"),
            "--set", "receiver=head")
    for extra in (("--budget", "600", "--keep", "5%"), ("--budget", "600", "--set", "teacher.epochs=3"),
                  ("--policy", "auto"), ("--budget", "100")):
        code, _, err = run(capsys, *base, *extra)
        assert code == 2 and one_line(err), (extra, err)
    assert not (tmp_path / "x.plada").exists()
    plain = tmp_path / "p.plada"
    P.write(plain, P.Payload(json.loads(json.dumps(FP)), 320, ("blue", "green", "red"), np.arange(3), np.arange(3)))
    code, _, err = run(capsys, "receive", str(plain), "--pool", "tinypool", "--data", str(tiny_data),
                       "--receiver", "head")
    assert code == 2 and one_line(err) and "head" in err


def test_demo_sends_a_head_by_default_and_the_paper_method_with_keep(tiny_data: Path, cache: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    base = ("demo", "--target", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data),
            "--set", "student.mode=linear")
    code, got, err = run(capsys, *base, "--out-dir", str(tmp_path / "h"))
    assert code == 0, err
    assert got["receiver"] == "head" and got["kept"] == 0 and got["teacher_accuracy"] is None
    assert got["payload_bytes"] <= 1000 and got["student_accuracy"] > 0.6 and 0 < got["forecast_accuracy"] <= 1
    assert not (cache / "teachers").exists()  # no teacher was trained
    code, got, err = run(capsys, *base, "--keep", "10%", "--set", "teacher.res=32", "--set", "teacher.epochs=2",
                         "--out-dir", str(tmp_path / "k"))
    assert code == 0, err
    assert got["receiver"] == "plain" and got["kept"] == 32 and 0 <= got["teacher_accuracy"] <= 1


def test_budget_default_is_a_head_and_plain_sends_labels() -> None:
    from plada.config import SendConfig

    assert SendConfig(budget=1000).check().sends_head
    assert not SendConfig(budget=1000, receiver="plain").check().sends_head
    assert not SendConfig().check().sends_head  # no budget: the paper's method, labels only
    assert SendConfig(receiver="head").check().sends_head  # a head beside a fixed selection
    SendConfig(budget=1000, holdout_groups=r"^(\d+)_").check()  # acts on the head's held-out rows
    with pytest.raises(Exception, match="add --set receiver=plain"):
        SendConfig(budget=1000, temperature=0.5).check()


def test_choose_holds_out_whole_groups(fold_split_calls: list) -> None:
    """With groups, no held-out row has a sibling among the fit rows (GTSRB's frames of one sign)."""
    seen = fold_split_calls
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(4), 100)
    x = (rng.normal(size=(4, 32))[y] * 2 + rng.normal(size=(400, 32))).astype(np.float32)
    g = np.arange(400) // 5  # 80 groups of 5
    ch = headmod.choose(x, y, 4, headmod.basis(x), "efficientnet-lite0", 64, lambda h: 100, None, groups=g)
    (groups, [(fit, held)]), = seen
    assert groups is g and not set(g[fit]) & set(g[held]) and 60 <= len(held) <= 100
    assert 0 < ch.forecast <= 1
    headmod.choose(x, y, 4, headmod.basis(x), "efficientnet-lite0", 64, lambda h: 100, None)
    assert len(seen) == 1  # without groups the seeded row split, as before


def test_send_passes_holdout_groups_to_the_head(tiny_data: Path, cache: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    got = []
    real = headmod.choose

    def spy(*args, **kw):
        got.append(kw.get("groups"))
        return real(*args, **kw)

    monkeypatch.setattr(headmod, "choose", spy)
    code, sent, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "--budget",
                          "600", "--set", r"holdout_groups=^\d(\d)", "-o", str(tmp_path / "g.plada"))
    assert code == 0, err
    (groups,) = got
    assert groups is not None and len(np.unique(groups)) == 3 * 4  # 3 colours x 4 tens digits of 000-039
    assert "note" not in sent or sent["payload_bytes"] * 2 <= 600
    code, big, err = run(capsys, "send", "tinytarget", "--pool", "tinypool", "--data", str(tiny_data), "--budget",
                         "20KB", "-o", str(tmp_path / "big.plada"))
    assert code == 0 and big["payload_bytes"] * 2 <= 20000 and "--set receiver=plain" in big["note"], err


def test_quantise_is_coarser_with_fewer_bits() -> None:
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(3, 5)), rng.normal(size=3)
    w8, _ = headmod.quantise(w, b, 8, "efficientnet-lite0", 64).dequantised()
    w4, b4 = headmod.quantise(w, b, 4, "efficientnet-lite0", 64).dequantised()
    assert np.abs(w8 - w).max() < np.abs(w4 - w).max() < np.abs(w).max() / 6
    assert np.allclose(b4, b, atol=1e-2)  # float16 bias
    z = headmod.quantise(np.zeros((2, 3)), np.zeros(2), 4, "efficientnet-lite0", 64)  # an all-zero row still sends
    assert (z.scales > 0).all() and not z.weights.any()


def test_head_receiver_never_opens_target_train(tiny_data: Path, cache: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from plada import data
    from plada.config import ReceiveConfig, SendConfig, StudentConfig
    from plada.pipeline import receive, send

    out = tmp_path / "h.plada"
    send("tinytarget", "tinypool", out, SendConfig(budget=600, receiver="head"), data=tiny_data, progress=False)
    real = data.Source.split

    def guarded(self, split):
        if self.name == "tinytarget" and split != "test":
            raise AssertionError(f"the receiver opened the target's {split} split")
        return real(self, split)

    monkeypatch.setattr(data.Source, "split", guarded)
    # a fine-tuned student of another resolution than the head's backbone: features come from the header's backbone
    cfg = ReceiveConfig(student=StudentConfig(mode="finetune", res=32, epochs=1.0), pseudo=60)
    rep = receive(out, "tinypool", cfg, data=tiny_data, test="tinytarget", progress=False)
    assert rep["receiver"]["mode"] == "head" and rep["receiver"]["trained_on"] == 60
    assert rep["receiver"]["backbone"] == "efficientnet-lite0" and 0 <= rep["student_accuracy"] <= 1


def test_student_mode_follows_the_payload_unless_asked() -> None:
    """A head payload's forecast assumed frozen features: its default student is linear; labels keep the paper's."""
    from plada.config import StudentConfig, check_student

    assert StudentConfig().mode is None
    assert StudentConfig().for_receiver("head").mode == "linear"
    assert StudentConfig().for_receiver("plain").mode == "finetune"
    assert StudentConfig().for_receiver("propagate").mode == "finetune"
    assert StudentConfig(mode="finetune").for_receiver("head").mode == "finetune"  # asked for: kept
    check_student(StudentConfig())  # None is a valid setting: resolved when the payload is read
    with pytest.raises(Exception, match="student.mode"):
        check_student(StudentConfig(mode="bogus"))


def test_pool_labels_are_capped_in_rows_whatever_the_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-pool share on ImageNet-21K would hold 14M rows of features: PSEUDO_MAX bounds them."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(400, 32)).astype(np.float32)
    pca = headmod.basis(feats)
    w, b = headmod.fit(pca.project(feats, 16), rng.integers(0, 3, 400), 3)
    h = headmod.quantise(w, b, 8, "efficientnet-lite0", 64)
    empty = np.zeros(0, np.int64)
    full = receiver.expand("head", feats, empty, empty, 3, head=h, progress=False)
    assert len(full.indices) == 400  # HEAD_SHARE 1.0: the whole pool
    sure = full.capped(30)  # a fine-tuned student's cap keeps the head's surest rows of each class
    conf = full.confidence
    for k in range(3):
        rows = np.flatnonzero(full.labels == k)
        assert set(sure.indices[sure.labels == k]) == set(full.indices[rows[np.argsort(-conf[rows])[:10]]])
    monkeypatch.setattr(receiver, "PSEUDO_MAX", 50)
    capped = receiver.expand("head", feats, empty, empty, 3, head=h, progress=False)
    assert len(capped.indices) == 50 and set(capped.indices) <= set(full.indices)
