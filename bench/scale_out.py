"""Per-image textual inversion across ranks: images per second with 1 and 2 processes (and on G GPUs).

Each rank is a process started as torchrun starts its workers (RANK, WORLD_SIZE, ... in its environment), joined
through ``privdiff.privacy.distributed``; it builds the tiny model, takes its slice of the images and trains
their embeddings batched (``train_sampled``, DPAgg-TI's per-image work). The clock runs from a barrier after
every rank is ready to a barrier after every rank is done, so model loading and imports are not counted.
CPU: 1 process, then 2 processes, one thread each (the tiny model is latency-bound: a second intra-op thread
made it slower, tests/conftest.py). GPU (when torch sees one):
G processes, one per GPU, with the raw UNet forward+backward rate of the same model at the same batch (the
ceiling: per-image TI is that plus the text encoder and the optimiser). The last line is the CPU ratio.

    python bench/scale_out.py [--images 16] [--steps 10] [--batch 4] [--model tiny]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(model: str, device: str):
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.registry import load_model

    backend = DiffusersBackend(load_model(model, device=device, dtype=torch.float32))
    backend.freeze()
    return backend


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rank(args: argparse.Namespace) -> None:
    """One rank: train this rank's slice of the images between two barriers; rank 0 prints the seconds."""
    import torch.distributed as dist

    from privdiff.embeddings.dpagg import train_sampled
    from privdiff.embeddings.textual_inversion import TIConfig, initial_vectors
    from privdiff.privacy.distributed import join_world, shares

    torch.set_num_threads(args.threads)
    world = join_world()
    device = f"cuda:{world.local_rank}" if args.device == "cuda" else "cpu"
    backend = _backend(args.model, device)
    config = TIConfig(steps=args.steps, batch_size=args.batch)
    init = initial_vectors(backend, config)
    rows = shares(args.images, world.size)[world.rank]
    images = torch.rand(len(rows), 3, backend.resolution, backend.resolution,
                        generator=torch.Generator().manual_seed(world.rank))
    train_sampled(backend, images[:1], [0], b"warm-up", init, TIConfig(steps=1, batch_size=args.batch))
    if world.size > 1:
        dist.barrier()
    start = time.perf_counter()
    train_sampled(backend, images, list(rows), b"\0" * 32, init, config)
    _sync(device)
    if world.size > 1:
        dist.barrier()
    if world.leader:
        print(f"{time.perf_counter() - start:.6f}")
    world.close()


def _run(args: argparse.Namespace, size: int, threads: int, device: str) -> float:
    """Images per second of ``size`` ranks of ``threads`` threads each on ``device``."""
    port = _port()
    command = [sys.executable, __file__, "--rank", "--images", str(args.images), "--steps", str(args.steps),
               "--batch", str(args.batch), "--model", args.model, "--threads", str(threads), "--device", device]
    procs = []
    for rank in range(size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads),
               "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a rank failed ({[p.returncode for p in procs]}): {outputs[0][1][-2000:]}")
    return args.images / float(outputs[0][0].split()[-1])


def _unet_ceiling(args: argparse.Namespace, device: str) -> float:
    """Images per second if per-image TI cost only the UNet's forward+backward at the same batch."""
    backend = _backend(args.model, device)
    unet = backend.pipe.unet
    side = backend.resolution // 8
    x = torch.randn(args.batch, unet.config.in_channels, side, side, device=device)
    t = torch.full((args.batch,), 500, device=device)
    width = unet.config.cross_attention_dim
    cond = torch.randn(args.batch, 77, width, device=device, requires_grad=True)

    def step() -> None:
        unet(x, t, encoder_hidden_states=cond).sample.square().mean().backward()

    for _ in range(3):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return args.batch / ((time.perf_counter() - start) / args.steps) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16, help="images trained in all (default 16)")
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per image (default 10)")
    parser.add_argument("--batch", type=int, default=4, help="images trained together (default 4)")
    parser.add_argument("--model", default="tiny", help="model name (default tiny)")
    parser.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank:
        _rank(args)
        return
    cores = os.cpu_count() or 1
    print(f"per-image TI, model {args.model}: {args.images} images, {args.steps} steps, batch {args.batch}; "
          f"{cores} CPU cores, gloo")
    if torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        rate = _run(args, gpus, 1, "cuda")
        ceiling = _unet_ceiling(args, "cuda:0")
        print(f"GPU: {gpus} x {torch.cuda.get_device_name(0)}: {rate:.2f} images/s, {rate / gpus:.2f} per GPU")
        print(f"GPU: raw UNet forward+backward at batch {args.batch} allows {ceiling:.2f} images/s per GPU; "
              f"per-image TI reaches {rate / gpus / ceiling:.0%} of it")
    else:
        print("GPU: torch sees no GPU here; the GPU part (one rank per GPU, and the raw UNet forward+backward "
              "ceiling) runs where one is")
    one = _run(args, 1, 1, "cpu")
    print(f"CPU 1 process x 1 thread: {one:.2f} images/s")
    two = _run(args, 2, 1, "cpu")
    print(f"CPU 2 processes x 1 thread: {two:.2f} images/s")
    print(f"ratio 2-rank/1-rank throughput: {two / one:.2f}")


if __name__ == "__main__":
    main()
