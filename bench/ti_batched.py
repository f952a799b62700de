"""Per-image textual inversion, batched vs one image at a time, on the tiny SD1 model.

Trains m embeddings with the same per-image random streams both ways, checks that they agree, and
prints time and peak memory of each and, on the last line, the speed ratio sequential / batched.
Times are the best of ``--repeats`` alternating runs. Peak memory: CUDA's max_memory_allocated on
a GPU; on the CPU, the bytes malloc has in use (glibc mallinfo2, which torch's CPU allocator goes
through) above the run's start, sampled every 5 ms.

Before that it prints the ceiling: a batched TI step against the model's raw forward and backward on
the same batch (text encoder with a gradient to its input embeddings, then the UNet; no draws, prompts
or optimizer), on the tiny model and, on a GPU, on a random-weight full-size SD1.5 at 512 px.

    .venv/bin/python bench/ti_batched.py [--images 16] [--steps 20] [--repeats 2] [--device cpu] [--threads 2]
"""

from __future__ import annotations

import argparse
import ctypes
import threading
import time
from contextlib import contextmanager

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from privdiff.embeddings.textual_inversion import TIConfig, initial_vectors, train_embeddings
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.tiny import tiny_pipeline, tiny_tokenizer


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _malloc_in_use() -> int:
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd  # heap chunks in use + mmapped chunks


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose "bytes" holds the run's peak memory once the block ends."""
    result: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - start
        return
    start, peak, done = _malloc_in_use(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _malloc_in_use() - start)
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield result
    done.set()
    thread.join()
    result["bytes"] = peak[0]


def timed_training(backend, latents, init, config, seed: int) -> tuple[dict, float, int]:
    """(embeddings, seconds, peak bytes) of one training of all latents with ``config``."""
    streams = [torch.Generator().manual_seed(seed + i) for i in range(len(latents))]
    with peak_memory(backend.device) as memory:
        start = time.perf_counter()
        out = train_embeddings(backend, latents, init, config, streams)
        if backend.device.type == "cuda":
            torch.cuda.synchronize(backend.device)
        seconds = time.perf_counter() - start
    return out, seconds, memory["bytes"]


def full_size_sd1(latent_size: int = 64) -> StableDiffusionPipeline:
    """A random-weight pipeline with SD1.5's UNet, text encoder and VAE shapes (the tiny tokenizer's vocabulary);
    ``latent_size`` 64 is 512 px."""
    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4,
                          sample_size=8 * latent_size),
        text_encoder=CLIPTextModel(text), tokenizer=tokenizer,
        unet=UNet2DConditionModel(sample_size=latent_size, cross_attention_dim=768),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                clip_sample=False, set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def raw_step_seconds(backend: DiffusersBackend, latents: torch.Tensor, steps: int) -> float:
    """Seconds per step of the model's forward and backward alone, as a TI step runs them on ``latents``: the
    text encoder on fixed ids with a gradient to its input embeddings, then the UNet and the noise MSE."""
    device, m = backend.device, len(latents)
    tokenizer, encoder = backend.pipe.tokenizer, backend.pipe.text_encoder
    ids = tokenizer(["a photo of a cat"] * m, padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(device)
    delta = torch.zeros(m, ids.shape[1], encoder.config.hidden_size, device=device, requires_grad=True)
    hook = encoder.get_input_embeddings().register_forward_hook(lambda module, args, out: out + delta.to(out.dtype))
    x = latents.to(device, backend.dtype)
    t = torch.randint(1000, (m,), device=device)
    noise = torch.randn_like(x)
    try:
        for step in range(steps + 1):  # the first is a warm-up
            if step == 1:
                _synchronize(device)
                start = time.perf_counter()
            hidden = encoder(ids).last_hidden_state
            pred = backend.pipe.unet(x + noise, t, encoder_hidden_states=hidden).sample
            (pred.float() - noise.float()).pow(2).mean().backward()
        _synchronize(device)
    finally:
        hook.remove()
    return (time.perf_counter() - start) / steps


def ti_step_seconds(backend: DiffusersBackend, latents: torch.Tensor, steps: int) -> float:
    """Seconds per step of batched TI on ``latents`` (all of them in one batch)."""
    init = initial_vectors(backend, TIConfig())
    config = TIConfig(steps=steps, batch_size=len(latents))
    train_embeddings(backend, latents, init, TIConfig(steps=1, batch_size=len(latents)),
                     [torch.Generator().manual_seed(i) for i in range(len(latents))])  # warm-up
    _synchronize(backend.device)
    start = time.perf_counter()
    train_embeddings(backend, latents, init, config, [torch.Generator().manual_seed(i) for i in range(len(latents))])
    _synchronize(backend.device)
    return (time.perf_counter() - start) / steps


def print_ceiling(name: str, backend: DiffusersBackend, latents: torch.Tensor, steps: int) -> None:
    """The batched TI step against the raw forward+backward at its batch, and how much faster than one image
    at a time the raw model alone gets at that batch (the most any batched TI could gain)."""
    raw = raw_step_seconds(backend, latents, steps)
    ti = ti_step_seconds(backend, latents, steps)
    single = raw_step_seconds(backend, latents[:1], steps)
    print(f"{name}, batch {len(latents)}: TI step {ti * 1e3:8.1f} ms, raw forward+backward {raw * 1e3:8.1f} ms, "
          f"ratio TI/raw {ti / raw:.2f}; raw at batch 1 {single * 1e3:.1f} ms, so batching gains at most "
          f"{single * len(latents) / raw:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; the best time counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    backend = DiffusersBackend(tiny_pipeline("sd1").to(args.device))
    backend.freeze()
    side = backend.resolution
    images = torch.rand(args.images, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = backend.encode_images(images.to(backend.device)).float().cpu()
    init = initial_vectors(backend, TIConfig())
    print_ceiling(f"ceiling on {args.device}: tiny SD1 (32 px)", backend, latents, args.steps)
    if backend.device.type == "cuda":
        full = DiffusersBackend(full_size_sd1().to(backend.device, torch.float16))
        full.freeze()
        big = torch.randn(args.images, 4, 64, 64, generator=torch.Generator().manual_seed(0))
        print_ceiling("ceiling on cuda: random-weight SD1.5 (512 px, fp16)", full, big, min(args.steps, 10))
        del full
    timed_training(backend, latents[:2], init, TIConfig(steps=2, batch_size=2), seed=0)  # warm-up

    runs = {"batched": args.images, "one at a time": 1}
    best: dict[str, tuple[dict, float, int]] = {}
    for _ in range(args.repeats):
        for name, batch_size in runs.items():
            result = timed_training(backend, latents, init, TIConfig(steps=args.steps, batch_size=batch_size), 1)
            if name not in best or result[1] < best[name][1]:
                best[name] = result
    (batched, t_batched, m_batched), (one_by_one, t_seq, m_seq) = best["batched"], best["one at a time"]
    diff = max((batched[k] - one_by_one[k]).abs().max().item() for k in batched)
    scale = max((batched[k] - init[k]).abs().max().item() for k in batched)
    # float32: the two agree to rounding (~1e-7), which Adam's g / sqrt(v) can enlarge on the odd coordinate
    # whose gradient is near zero (in float64 they are bit-identical; tests/test_textual_inversion.py).
    agree = sum(int(((batched[k] - one_by_one[k]).abs() <= 1e-5).sum()) for k in batched)
    agree /= sum(v.numel() for v in batched.values())
    if agree < 0.999 or diff > 0.05 * scale:
        raise SystemExit(f"batched and one-at-a-time training disagree: max diff {diff:.2e}, "
                         f"{agree:.4%} of coordinates within 1e-5")

    print(f"device {args.device}, threads {torch.get_num_threads()}, m={args.images} embeddings, "
          f"{args.steps} steps each, tiny SD1 (32 px), best of {args.repeats}")
    print(f"one at a time: {t_seq:8.2f} s   peak memory {m_seq / 2**20:8.1f} MiB")
    print(f"batched      : {t_batched:8.2f} s   peak memory {m_batched / 2**20:8.1f} MiB")
    print(f"max |batched - one at a time| = {diff:.2e} (largest trained change {scale:.2e}); "
          f"{agree:.3%} of coordinates within 1e-5")
    print(f"ratio sequential/batched: {t_seq / t_batched:.2f}x")


if __name__ == "__main__":
    main()
