"""Cost of one universal-guidance step (k = 1) over a plain classifier-free DDIM step, on the tiny SD1 model.

The guided step runs the UNet forward with autograd on, decodes x̂0 with the VAE, embeds it with the
image encoder, and back-propagates through all three: its floor is about one extra backward pass
through UNet, VAE decoder and encoder. Both steps are timed alternately in this process (median of
repeats); the breakdown times the guided step's parts. Peak memory is measured per step kind in a
fresh child process (max RSS on CPU, max allocated on CUDA). The last line is the ratio guided / plain.

    python bench/guidance_step.py [--repeats 20] [--batch 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def _setup(device: str, batch: int):
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.image_encoders import tiny_image_encoder
    from privdiff.models.tiny import tiny_pipeline

    backend = DiffusersBackend(tiny_pipeline("sd1").to(device))
    backend.freeze()
    encoder = tiny_image_encoder().to(device)
    cond = backend.encode_text(["a painting of a cat"] * batch)
    uncond = backend.encode_text([""] * batch)
    target = F.normalize(torch.randn(encoder.dim, generator=torch.Generator().manual_seed(0)), dim=0).to(device)
    z = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    return backend, encoder, cond, uncond, target, z


def _step(kind: str, backend, encoder, cond, uncond, target, z) -> torch.Tensor:
    from privdiff.guidance.sampler import GuidanceConfig, guided_noise

    config = GuidanceConfig(cfg=3.0, weight=6.0 if kind == "guided" else 0.0, recurrence=1)
    return guided_noise(backend, z, 501, cond, uncond, config, encoder, target)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(kind: str, device: str, batch: int, queue) -> None:
    torch.set_num_threads(1)
    parts = _setup(device, batch)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        _step(kind, *parts)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(peak)


def peak_memory(kind: str, device: str, batch: int) -> int:
    """Peak bytes of a fresh process that sets up and runs three steps of ``kind``."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak, args=(kind, device, batch, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def breakdown(backend, encoder, cond, uncond, target, z, device: str, repeats: int) -> dict[str, float]:
    """Median seconds of the guided step's parts: UNet forward, decode + embed forward, backward."""
    from privdiff.guidance.sampler import guidance_loss
    from privdiff.models.sampling import cfg_noise

    a = backend.alphas_cumprod[501]
    times: dict[str, list[float]] = {"UNet forward (CFG batch)": [], "VAE decode + encoder forward": [],
                                     "backward through all three": []}
    for _ in range(repeats):
        with torch.enable_grad():
            x = z.clone().requires_grad_(True)
            t0 = time.perf_counter()
            eps = cfg_noise(backend, x, 501, cond, uncond, 3.0)
            _sync(device)
            t1 = time.perf_counter()
            loss = guidance_loss(backend, encoder, target, x, eps, a, 100.0)
            _sync(device)
            t2 = time.perf_counter()
            torch.autograd.grad(loss, x)
            _sync(device)
            t3 = time.perf_counter()
        for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
            times[key].append(value)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    parts = _setup(args.device, args.batch)
    for kind in ("plain", "guided"):  # warm-up
        _step(kind, *parts)
    timings: dict[str, list[float]] = {"plain": [], "guided": []}
    for _ in range(args.repeats):
        for kind in ("plain", "guided"):
            start = time.perf_counter()
            _step(kind, *parts)
            _sync(args.device)
            timings[kind].append(time.perf_counter() - start)
    plain, guided = (statistics.median(timings[k]) for k in ("plain", "guided"))
    print(f"tiny SD1, batch {args.batch}, {args.device}, median of {args.repeats}")
    for name, seconds in (("plain CFG step", plain), ("guided step", guided)):
        peak = peak_memory(name.split()[0], args.device, args.batch) / 2**20
        print(f"{name + ':':<16} {seconds * 1e3:8.2f} ms   peak memory {peak:7.1f} MiB")
    for name, seconds in breakdown(*parts, args.device, args.repeats).items():
        print(f"  {name:<30} {seconds * 1e3:8.2f} ms")
    print(f"ratio guided/plain step time: {guided / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
