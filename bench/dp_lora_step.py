"""A DP-LoRA step against a non-private LoRA step of the same model, adapters and batch.

Both train the same LoRA adapters (``privdiff.lora.adapters``) on the UNet of ``--model`` with Adam. The
non-private step is one mean loss over a batch of B examples and one backward; the DP step is
``privdiff.lora.training.train_dp_lora``'s: a Poisson batch of expected size B, per-sample gradients of the
adapters from opacus (hooks on the adapters' Linear layers, in padded microbatches of ``pass_rows`` rows: B on
a CPU, B/4 on a GPU), clipping, the CSPRNG's Gaussian noise and the same Adam. Timings alternate between the two
in one process and take medians. On a GPU it prints each run's peak memory above what was allocated before it
(``torch.cuda.max_memory_allocated`` after a reset); on the CPU the allocator keeps freed memory resident, so it
prints what the DP step adds by construction instead: the per-sample gradients of one microbatch, float32.

    python bench/dp_lora_step.py [--model small] [--batch 16] [--steps 6] [--rounds 3] [--rank 4] [--device cpu]

The last line is ``ratio DP/non-private LoRA step: X``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch

from privdiff.lora.adapters import attach, detach
from privdiff.lora.training import LoRAConfig, LoRASettings, pass_rows, train_dp_lora
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.registry import load_model
from privdiff.models.training import noise_prediction_loss
from privdiff.privacy.distributed import World
from privdiff.privacy.randomness import SecureRandom

N = 256
"""Private examples (random latents: the step's cost does not depend on what they show)."""


def _setup(args: argparse.Namespace) -> tuple[DiffusersBackend, torch.Tensor]:
    backend = DiffusersBackend(load_model(args.model, device=args.device))
    backend.freeze()
    side = backend.resolution // backend.pipe.vae_scale_factor
    latents = torch.randn(N, backend.pipe.unet.config.in_channels, side, side,
                          generator=torch.Generator().manual_seed(0))
    return backend, latents


def _config(args: argparse.Namespace) -> LoRAConfig:
    return LoRAConfig(rank=args.rank, alpha=float(args.rank), steps=args.steps, lr=1e-3, batch_size=args.batch,
                      prompt="a picture")


def plain_steps(backend: DiffusersBackend, latents: torch.Tensor, config: LoRAConfig) -> float:
    """Seconds per non-private step (batch of ``config.batch_size``)."""
    gen = torch.Generator().manual_seed(1)
    adapters = attach(backend.denoiser, config.rank, config.alpha, config.targets, gen)
    params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    cond = backend.encode_text([config.prompt] * config.batch_size)
    steps = len(backend.alphas_cumprod)
    start = time.perf_counter()
    for _ in range(config.steps):
        batch = torch.randint(len(latents), (config.batch_size,), generator=gen)
        x0 = latents[batch].to(backend.device)
        t = torch.randint(steps, (config.batch_size,), generator=gen).to(backend.device)
        noise = torch.randn(x0.shape, generator=gen).to(backend.device)
        optimizer.zero_grad(set_to_none=True)
        noise_prediction_loss(backend, x0, t, noise, cond).mean().backward()
        optimizer.step()
    _sync(backend)
    seconds = (time.perf_counter() - start) / config.steps
    detach(backend.denoiser, adapters)
    return seconds


def dp_steps(backend: DiffusersBackend, latents: torch.Tensor, config: LoRAConfig) -> float:
    """Seconds per DP-SGD step (Poisson batches of expected size ``config.batch_size``)."""
    rng = SecureRandom()
    settings = LoRASettings(config, sample_rate=config.batch_size / len(latents), clip_norm=1.0,
                            noise_multiplier=1.0, public_size=len(latents), key=rng.random_bytes(32))
    start = time.perf_counter()
    adapters = train_dp_lora(World(), backend, latents, range(len(latents)), len(latents), settings, rng)
    _sync(backend)
    seconds = (time.perf_counter() - start) / config.steps
    detach(backend.denoiser, adapters)
    return seconds


def _sync(backend: DiffusersBackend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.synchronize()


def _measured(run, backend: DiffusersBackend) -> tuple[float, float | None]:
    """(seconds per step, peak MB above the memory allocated before; None on the CPU) of ``run()``."""
    gc.collect()
    if backend.device.type != "cuda":
        return run(), None
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    seconds = run()
    return seconds, (torch.cuda.max_memory_allocated() - before) / 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="small", help="model spec as for --model (default: small)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch", type=int, default=16, help="batch size, and the DP step's expected batch")
    parser.add_argument("--steps", type=int, default=6, help="steps per timed run (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed runs of each (default 3)")
    parser.add_argument("--rank", type=int, default=4, help="adapter rank (default 4)")
    args = parser.parse_args(argv)
    backend, latents = _setup(args)
    config = _config(args)
    plain_steps(backend, latents, LoRAConfig(**{**config.__dict__, "steps": 1}))  # warm-up
    plain, dp, plain_mb, dp_mb = [], [], [], []
    for _ in range(args.rounds):
        for times, memory, steps in ((plain, plain_mb, plain_steps), (dp, dp_mb, dp_steps)):
            seconds, mb = _measured(lambda steps=steps: steps(backend, latents, config), backend)
            times.append(seconds)
            memory.append(mb)
    adapters = attach(backend.denoiser, config.rank, config.alpha, config.targets, torch.Generator())
    size = sum(p.numel() for a in adapters.values() for p in a.parameters())
    detach(backend.denoiser, adapters)
    print(f"DP-LoRA step vs non-private LoRA step: model {args.model} on {backend.device}, {len(adapters)} adapted "
          f"layers, {size} adapter parameters (rank {args.rank}), batch {args.batch}, {torch.get_num_threads()} "
          f"threads, {args.rounds} runs of {args.steps} steps each")
    print(f"non-private step: {statistics.median(plain) * 1e3:.0f} ms (runs: "
          f"{', '.join(f'{s * 1e3:.0f}' for s in plain)})")
    print(f"DP step:          {statistics.median(dp) * 1e3:.0f} ms (runs: {', '.join(f'{s * 1e3:.0f}' for s in dp)})")
    if backend.device.type == "cuda":
        print(f"peak memory above the loaded model: non-private {max(plain_mb):.0f} MB, DP {max(dp_mb):.0f} MB")
    else:
        rows = pass_rows(config, args.batch, backend.device)
        print(f"per-sample gradients of one microbatch: {rows} x {size} parameters x 4 bytes = "
              f"{rows * size * 4 / 2**20:.0f} MB (the DP step's addition; peaks are measured on a GPU)")
    print(f"ratio DP/non-private LoRA step: {statistics.median(dp) / statistics.median(plain):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
