"""One CUDA check of `--device` (issue 18): how close plada's scoring and training paths come to the bare model.

At 224 px in mixed precision (`plada.device.amp_dtype`: bf16 from Ampere on, else fp16), channels_last:

- scoring: a bare forward over batches already on the GPU, against `train.predict` (host uint8 batches,
  pinned, prefetched, resized and normalised on the GPU) and the local engine (`score.score_pool`, chunk files);
- training: a bare forward+backward+AdamW step on a batch already on the GPU, against `train.fit` (gather,
  augmentation, schedule, the GradScaler where fp16);
- decoding: scoring a folder of synthetic full-resolution JPEGs (`score.score_pool` on a folder pool) with
  decoding in threads, then in worker processes (`PLADA_DECODE_PROCESSES`), against the bare forward;
- Ray: `engines.score_pool_ray` with one actor per GPU, when ray is installed;
- agreement: plada's mixed-precision logits against a float32 forward of the same images.

The model is ConvNeXt-T (timm) or ResNet-50 (torchvision) with random weights when either is installed,
else EfficientNet-Lite0 from plada's registry. Writes results/engine_gpu.json. Without CUDA it stops at
once; ``--smoke`` runs every step tiny (32 px, a few batches) on whatever device there is, CPU included,
so the script is known to execute where no GPU is, and writes to the temp folder unless ``--out`` is given.

    scripts/gpu_check.sh [--smoke] [--out results/engine_gpu.json] [--model auto|convnext|resnet50|lite0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def fail(msg: str) -> None:
    print(f"gpu_check: error: {msg}", file=sys.stderr)
    sys.exit(2)


def build_model(choice: str, res: int, classes: int):
    """(model, how it was built): the first of ConvNeXt-T, ResNet-50, EfficientNet-Lite0 that is installed."""
    from plada import backbones

    if choice in ("auto", "convnext"):
        try:
            import timm  # noqa: F401

            return backbones.create("timm:convnext_tiny", classes, res, pretrained=False), "timm:convnext_tiny"
        except ImportError:
            if choice == "convnext":
                fail("--model convnext needs timm")
    if choice in ("auto", "resnet50"):
        try:
            import torchvision  # noqa: F401

            return backbones.create("tv:resnet50", classes, res, pretrained=False), "tv:resnet50"
        except ImportError:
            if choice == "resnet50":
                fail("--model resnet50 needs torchvision")
    return backbones.create("efficientnet-lite0", classes, res, pretrained=False), "efficientnet-lite0"


def to(model, dev):
    """The model on ``dev`` laid out as plada lays it there (`device.placed`): channels_last on CUDA only."""
    import torch

    if dev.type == "cuda":
        return model.to(dev, memory_format=torch.channels_last)
    return model.to(dev, memory_format=torch.contiguous_format)


def layout(dev):
    import torch

    return torch.channels_last if dev.type == "cuda" else torch.contiguous_format


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(dev, fn) -> float:
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def bare_forward(model, dev, amp, batch: int, res: int, batches: int) -> float:
    """Images per second of the model alone: one normalised batch already on the device, no host work."""
    import torch

    x = torch.randn(batch, 3, res, res, device=dev).contiguous(memory_format=layout(dev))
    model.eval()

    def run(n: int) -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            for _ in range(n):
                model(x)

    run(2)  # warm-up: kernels chosen, memory pooled
    return batch * batches / timed(dev, lambda: run(batches))


def bare_train(model, dev, amp, batch: int, res: int, steps: int) -> float:
    """Images per second of forward+backward+AdamW on one batch already on the device."""
    import torch
    import torch.nn.functional as F

    from plada.device import needs_scaler

    x = torch.randn(batch, 3, res, res, device=dev).contiguous(memory_format=layout(dev))
    y = torch.randint(0, model.head.out_features, (batch,), device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True if dev.type == "cuda" else None)  # as fit
    scaler = torch.amp.GradScaler(dev.type) if needs_scaler(amp) else None
    model.train()

    def run(n: int) -> None:
        for _ in range(n):
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()

    run(2)
    out = batch * steps / timed(dev, lambda: run(steps))
    model.eval()
    return out


def fp32_agreement(model, dev, images: np.ndarray, got: np.ndarray) -> dict:
    """plada's mixed-precision logits against a float32 forward of the same images on the same device."""
    import torch

    from plada.backbones import prepare

    with torch.inference_mode():
        x = prepare(torch.from_numpy(np.array(images)).to(dev), model).contiguous(memory_format=layout(dev))
        ref = model(x).float().cpu().numpy()
    diff = np.abs(got - ref)
    return {"images": len(images), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "logit_scale": float(np.abs(ref).mean()),
            "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean())}


def ray_section(model, name: str, pool_dir: Path, res: int, batch: int, n: int, chunk: int) -> dict:
    """`engines.score_pool_ray` over a memory-mapped pool of ``n`` images, then over the decode section's JPEG
    folder pool when it was made: one actor per GPU."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return {"skipped": "ray is not installed"}
    from plada import backbones, engines
    from plada.pool import Pool

    if not (name in backbones.REGISTRY or name.startswith(("timm:", "tv:"))):
        model = backbones.create("efficientnet-lite0", model.head.out_features, res, pretrained=False)
        name = "efficientnet-lite0"  # actors rebuild the model from plada's registry
    pool = Pool("gpu-check", pool_dir, np.load(pool_dir / "images.npy", mmap_mode="r"),
                [f"f{i // 1000}/{i}" for i in range(n)], ["0" * 64] * n, "ray" + "0" * 61)
    cache = pool_dir / "scores-ray"
    t, st = time.perf_counter(), engines.RayStats()
    scores = engines.score_pool_ray(model.cpu(), pool, cache, batch_size=batch, progress=False, chunk=chunk, stats=st)
    wall = time.perf_counter() - t
    out = {"model": name, "images": n, "actors": st.actors, "gpus_per_actor": st.gpus_per_actor,
           "units": st.units, "wall_seconds": round(wall, 2), "wall_img_s": round(n / wall, 1),
           "actor_seconds": round(st.actor_seconds, 2),
           "actor_img_s": round(n / st.actor_seconds, 1) if st.actor_seconds else None,
           "read_seconds": round(st.read_seconds, 2), "logits_shape": list(scores.logits.shape),
           "note": "wall includes starting Ray and its actors; actor_img_s is the scoring itself"}
    if (pool_dir / "jpegpool" / "pool.json").is_file():  # the decode section's JPEG folder: actors decode it
        from plada.pool import open_pool

        jpegs = open_pool(pool_dir / "jpegpool", build=False, progress=False)
        t, st = time.perf_counter(), engines.RayStats()
        engines.score_pool_ray(model.cpu(), jpegs, pool_dir / "scores-ray-jpeg", batch_size=batch, progress=False,
                               chunk=max(batch, len(jpegs) // 4), stats=st)
        wall = time.perf_counter() - t
        out["jpeg_folder"] = {"images": len(jpegs), "actors": st.actors, "units": st.units,
                              "wall_img_s": round(len(jpegs) / wall, 1),
                              "actor_img_s": round(len(jpegs) / st.actor_seconds, 1) if st.actor_seconds else None,
                              "note": "each actor opens the pool and decodes its own rows' JPEGs at the model's size"}
    return out


def decode_section(model, dev, tmp: Path, res: int, batch: int, n: int, bare: float) -> dict:
    """Scoring from JPEG files (400x300, as ImageNet's typical size) with decoding in threads, then processes."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from plada import images as imgs
    from plada import score
    from plada.pool import build_pool

    root = tmp / "jpegs" / "train"
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)

    def write(i: int) -> None:
        d = root / f"n{i % 10:08d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(d / f"n{i % 10:08d}_{i}.JPEG", quality=90)

    with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        list(ex.map(write, range(n)))
    pool = build_pool([str(root)], name="gpu-check-jpegs", out=tmp / "jpegpool", progress=False)
    procs = max(1, min(16, (os.cpu_count() or 2) - 1))
    out = {"images": n, "jpeg": "400x300", "res": res, "cpus": os.cpu_count(), "processes": procs}
    for label, env in (("threads", "0"), ("processes", str(procs))):
        os.environ[imgs.PROCESSES_ENV] = env
        t = time.perf_counter()
        score.score_pool(model, pool, tmp / f"dscores-{label}", batch_size=batch, progress=False, device=dev)
        sync(dev)
        out[f"{label}_img_s"] = round(n / (time.perf_counter() - t), 1)
    os.environ.pop(imgs.PROCESSES_ENV, None)
    out["processes_vs_threads"] = round(out["processes_img_s"] / out["threads_img_s"], 3)
    out["processes_vs_bare"] = round(out["processes_img_s"] / bare, 3)
    return out


def machine(dev) -> dict:
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(dev)}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, gpus=torch.cuda.device_count(), capability=list(torch.cuda.get_device_capability(dev)),
                    gpu_memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                    cudnn_benchmark=torch.backends.cudnn.benchmark)
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=10).stdout.strip())
        info.update(commit=commit or None, dirty=dirty)
    except (OSError, subprocess.SubprocessError):
        info.update(commit=None)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (32 px, a few batches) on any device, CPU too")
    ap.add_argument("--out", default=None, help="JSON to write (default results/engine_gpu.json; --smoke: temp)")
    ap.add_argument("--model", default="auto", choices=["auto", "convnext", "resnet50", "lite0"])
    ap.add_argument("--ray", choices=["auto", "on", "off"], default="auto",
                    help="the Ray section: auto runs it with CUDA and ray installed (not in --smoke)")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later sections are skipped past it")
    a = ap.parse_args()
    t0 = time.perf_counter()
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's plada, installed or not

    import torch

    if not a.smoke and not torch.cuda.is_available():
        fail(f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}): run this on a "
             "CUDA machine, or pass --smoke for a tiny run on this one")
    from plada import engines, score, train
    from plada.device import amp_dtype, resolve

    dev = resolve("auto")
    amp = amp_dtype(dev)
    res, classes = (32, 10) if a.smoke else (224, 1000)
    pb, tb = (16, 8) if a.smoke else (256, 128)  # scoring and training batch sizes
    n_pred, fwd_batches, steps = (64, 2, 3) if a.smoke else (8192, 30, 40)
    out = Path(a.out) if a.out else (Path(tempfile.gettempdir()) / "engine_gpu_smoke.json" if a.smoke
                                     else ROOT / "results" / "engine_gpu.json")
    torch.manual_seed(0)
    model, name = build_model(a.model, res, classes)  # lite0 skips the first two
    model = model.eval()
    report: dict = {"smoke": a.smoke, "machine": machine(dev), "model": name, "res": res, "classes": classes,
                    "amp_dtype": None if amp is None else str(amp).removeprefix("torch."),
                    "channels_last": dev.type == "cuda", "weights": "random"}
    print(f"gpu_check: {name} at {res} px on {dev} ({report['amp_dtype'] or 'float32'})", file=sys.stderr)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="plada-gpu-check-") as tmp:
        pool_dir = Path(tmp)
        images = rng.integers(0, 256, (n_pred, res, res, 3), dtype=np.uint8)
        np.save(pool_dir / "images.npy", images)
        del images
        images = np.load(pool_dir / "images.npy", mmap_mode="r")  # a pool's images are a memory map

        # scoring
        to(model, dev)
        bare = bare_forward(model, dev, amp, pb, res, fwd_batches)
        to(model, torch.device("cpu"))
        train.predict(model, images[: 2 * pb], batch_size=pb, progress=False, device=dev)  # warm-up
        logits: list[np.ndarray] = []
        s = timed(dev, lambda: logits.append(train.predict(model, images, batch_size=pb, progress=False, device=dev)))
        from plada.pool import Pool

        pool = Pool("gpu-check", pool_dir, images, [f"f{i // 1000}/{i}" for i in range(n_pred)], ["0" * 64] * n_pred,
                    "local" + "0" * 59)
        s_pool = timed(dev, lambda: engines.score(model, pool, pool_dir / "scores", batch_size=pb, progress=False,
                                                   device=dev))
        agree_n = min(n_pred, 2 * pb)
        to(model, dev)
        agree = fp32_agreement(model, dev, images[:agree_n], logits[0][:agree_n])
        to(model, torch.device("cpu"))
        report["score"] = {"batch_size": pb, "images": n_pred, "bare_forward_img_s": round(bare, 1),
                           "plada_predict_img_s": round(n_pred / s, 1),
                           "plada_score_pool_img_s": round(n_pred / s_pool, 1),
                           "predict_vs_bare": round(n_pred / s / bare, 3), "score_chunk": score.chunk_size(),
                           "agreement_vs_fp32": agree}
        print(f"gpu_check: score {json.dumps(report['score'])}", file=sys.stderr)

        # training
        if time.perf_counter() - t0 < a.budget:
            to(model, dev)
            bare_t = bare_train(model, dev, amp, tb, res, steps)
            to(model, torch.device("cpu"))
            n_train = min(n_pred, tb * 8)
            labels = rng.integers(0, classes, n_train)
            epochs = steps / -(-n_train // tb)
            train.fit(model, images[:n_train], labels, epochs=2 / -(-n_train // tb), batch_size=tb, progress=False,
                      device=dev)  # warm-up
            losses: list[list[float]] = []
            s_fit = timed(dev, lambda: losses.append(train.fit(model, images[:n_train], labels, epochs=epochs,
                                                               batch_size=tb, progress=False, device=dev)))
            report["train"] = {"batch_size": tb, "steps": len(losses[0]), "bare_step_img_s": round(bare_t, 1),
                               "plada_fit_img_s": round(len(losses[0]) * tb / s_fit, 1),
                               "fit_vs_bare": round(len(losses[0]) * tb / s_fit / bare_t, 3),
                               "losses_finite": bool(np.isfinite(losses[0]).all()),
                               "grad_scaler": amp == torch.float16}
            print(f"gpu_check: train {json.dumps(report['train'])}", file=sys.stderr)
        else:
            report["train"] = {"skipped": f"past the {a.budget:g} s budget"}

        # decoding: a JPEG folder scored with threads, then with worker processes
        if time.perf_counter() - t0 < a.budget:
            try:
                report["decode"] = decode_section(model, dev, pool_dir, res, pb, 64 if a.smoke else 4096, bare)
            except Exception as e:  # noqa: BLE001 - the other sections' figures are still worth writing
                report["decode"] = {"error": f"{type(e).__name__}: {e}"}
        else:
            report["decode"] = {"skipped": f"past the {a.budget:g} s budget"}
        print(f"gpu_check: decode {json.dumps(report['decode'])}", file=sys.stderr)

        # Ray
        want_ray = a.ray == "on" or (a.ray == "auto" and dev.type == "cuda" and not a.smoke)
        if not want_ray:
            report["ray"] = {"skipped": "not asked for" if a.ray == "off" or a.smoke else "no CUDA"}
        elif time.perf_counter() - t0 > a.budget:
            report["ray"] = {"skipped": f"past the {a.budget:g} s budget"}
        else:
            try:
                report["ray"] = ray_section(model, name, pool_dir, res, pb, n_pred, chunk=max(pb, n_pred // 4))
            except Exception as e:  # noqa: BLE001 - the other sections' figures are still worth writing
                report["ray"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"gpu_check: ray {json.dumps(report['ray'])}", file=sys.stderr)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    os.replace(tmp_out, out)
    print(f"gpu_check: wrote {out} in {report['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
