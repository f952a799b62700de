"""Per-step cost of encrypted denoising on SD1.5's latent (4 x 64 x 64), and what the worker can rebuild.

Methods, each timed over the same DDIM steps (the tiny model's predictions stand in for the UNet; its time is
not counted, only selection, packing, encryption, the update, decryption and merging):
  - **naive (reference style)**: every selected element its own CKKS tensor (TenSEAL ``ckks_tensor``) with
    HE-Diffusion's parameters (8192, [31, 26 x 6, 31], 2**26); timed on ``--naive-elements`` elements and
    scaled to the selected count (it takes minutes per step at full size),
  - **reference sparse**: the selected values in one CKKS vector with the same parameters, ct x f + b,
  - **ours**: ``privdiff.he`` (symmetric CKKS, N = 16384, one 60-bit data prime, scale 2**40, depth 0),
    sparse and dense packing, with plain or encrypted offsets, in one process and over loopback to
    ``privdiff he worker`` (bytes per step).
The error is the largest difference from the plaintext step. Then the worker's view of whole sampling runs
(the small reference model, 20 steps) is turned into its best estimate of the result (``privdiff.he.leak``):
PSNR against the true final latent, the same for a worker who knows the seed (so the initial latent), and the
share of elements it knows exactly. The last line is the ratio
of the reference sparse method's per-step time to ours (sparse, one process).

    python bench/he_step.py [--steps 5] [--naive-elements 64]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time

import numpy as np
import tenseal as ts
import torch

from privdiff.he import steps
from privdiff.he.ckks import CKKSParams, KeyHolder
from privdiff.he.leak import psnr, reconstruct
from privdiff.he.protocol import LocalWorker, RemoteWorker
from privdiff.he.sampler import HEConfig, sample
from privdiff.he.selection import select
from privdiff.he.stepper import EncryptedStepper
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.registry import load_model
from privdiff.models.sampling import cfg_noise, ddim_timesteps

THRESHOLD = 0.01


def reference_context() -> ts.Context:
    params = CKKSParams.reference()
    context = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    context.global_scale = 2.0**params.scale_bits
    return context


def reference_sparse(context: ts.Context, z: torch.Tensor, update: steps.Update) -> torch.Tensor:
    """HE-Diffusion's step: select, one CKKS vector of the selected values, ct x f + b, decrypt, merge."""
    mask = select(z, THRESHOLD).flatten()
    flat, offset = z.flatten().double(), update.offset.flatten().double()
    vector = ts.ckks_vector(context, flat[mask].tolist())
    result = vector * update.factor + offset[mask].tolist()
    out = update.factor * flat + offset
    out[mask] = torch.tensor(result.decrypt(), dtype=torch.float64)
    return out.view(z.shape)


def naive(context: ts.Context, z: torch.Tensor, update: steps.Update, elements: int) -> tuple[float, float]:
    """Seconds and error of the per-element reference path on the first ``elements`` selected elements."""
    mask = select(z, THRESHOLD).flatten()
    values = z.flatten().double()[mask][:elements]
    offsets = update.offset.flatten().double()[mask][:elements]
    start = time.perf_counter()
    tensor = ts.ckks_tensor(context, values.tolist())
    result = np.array((tensor * update.factor + ts.plain_tensor(offsets.tolist())).decrypt().tolist())
    seconds = time.perf_counter() - start
    return seconds, float(np.abs(result - (update.factor * values + offsets).numpy()).max())


def start_worker() -> tuple[subprocess.Popen, str]:
    worker = subprocess.Popen([sys.executable, "-m", "privdiff.cli", "he", "worker", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    while not lines or lines[-1].strip() != "}":
        lines.append(worker.stdout.readline())
        if not lines[-1]:
            raise SystemExit("privdiff he worker exited before listening")
    return worker, json.loads("".join(lines))["listening"]


def leak_rows(threshold: float) -> list[tuple[str, float, float, float, float]]:
    """(mode, PSNR of the worker's estimate, the same knowing the seed, PSNR of guessing zero, share known
    exactly) for whole runs."""
    backend = DiffusersBackend(load_model("small"))
    cond, uncond = backend.encode_text(["a red star in teal stripes style"] * 4), backend.encode_text([""] * 4)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    holder = KeyHolder()
    alphas = backend.alphas_cumprod.double()
    t, t_prev = ddim_timesteps(len(alphas), 20)[0]
    a, a_prev = float(alphas[t]), float(alphas[t_prev])
    first = math.sqrt(1 - a_prev) - math.sqrt(a_prev / a) * math.sqrt(1 - a)  # public: the schedule is known
    rows = []
    for sampler in ("ddim", "euler"):
        for packing, hidden in (("sparse", False), ("dense", False), ("dense", True)):
            view: list = []
            stepper = EncryptedStepper(holder, LocalWorker(holder.public_context(), record=view), threshold,
                                       packing, encrypt_offsets=hidden)
            final = sample(backend, cond, uncond, latents, HEConfig(steps=20, cfg=3.0, sampler=sampler), stepper)
            truth = final.double().numpy().ravel()
            initial = latents.double().numpy().ravel()
            if sampler == "euler":  # the stepper's state is k-diffusion's x = z / sqrt(alpha)
                truth = truth / math.sqrt(float(alphas[0]))
                initial = initial / math.sqrt(a)
            estimate, exact = reconstruct(view, truth.size, first if sampler == "ddim" else None)
            seeded, _ = reconstruct(view, truth.size, initial=initial)
            label = f"{sampler}, {packing}, offsets {'encrypted' if hidden else 'plain'}"
            rows.append((label, psnr(estimate, truth), psnr(seeded, truth), psnr(np.zeros_like(truth), truth),
                         float(exact.mean())))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="DDIM steps timed (of a 50-step schedule)")
    parser.add_argument("--naive-elements", type=int, default=64, help="elements the naive path is timed on")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backend = DiffusersBackend(load_model("tiny"))
    cond, uncond = backend.encode_text(["a photo"]), backend.encode_text([""])
    alphas = backend.alphas_cumprod.double()
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    updates = []
    for t, t_prev in ddim_timesteps(len(alphas), 50)[: args.steps]:
        with torch.no_grad():
            eps = cfg_noise(backend, z.float(), t, cond, uncond, 7.5).double()
        updates.append((z, steps.ddim(eps, float(alphas[t]), float(alphas[t_prev]))))
        z = updates[-1][1].apply(z)

    context = reference_context()
    holder = KeyHolder()
    worker, address = start_worker()
    rows = []
    try:
        fraction = float(np.mean([select(state, THRESHOLD).float().mean() for state, _ in updates]))
        seconds, error = zip(*(naive(context, s, u, args.naive_elements) for s, u in updates[:2]), strict=True)
        per_element = statistics.median(seconds) / args.naive_elements
        rows.append(("naive, per-element tensors (reference params)", per_element * fraction * z.numel(),
                     max(error), fraction, None))

        def run(name: str, step, link=None) -> None:  # noqa: ANN001
            times, errors = [], []
            for state, update in updates:
                start = time.perf_counter()
                out = step(state, update)
                times.append(time.perf_counter() - start)
                errors.append(float((out - update.apply(state)).abs().max()))
            sent = (link.sent + link.received) / len(updates) if link is not None else None
            share = step.stats.fraction if isinstance(step, EncryptedStepper) else fraction
            rows.append((name, statistics.median(times), max(errors), share, sent))

        run("reference sparse, one COO vector (reference params)", lambda s, u: reference_sparse(context, s, u))
        for packing, hidden in (("sparse", False), ("dense", False), ("dense", True)):
            link = LocalWorker(holder.public_context())
            run(f"ours, {packing}, offsets {'encrypted' if hidden else 'plain'}, one process",
                EncryptedStepper(holder, link, THRESHOLD, packing, encrypt_offsets=hidden), link)
        for packing in ("sparse", "dense"):
            link = RemoteWorker(address, holder.public_context())
            run(f"ours, {packing}, two processes over loopback",
                EncryptedStepper(holder, link, THRESHOLD, packing, encrypt_offsets=False), link)
            link.close()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    leaks = leak_rows(THRESHOLD)

    print(f"\nencrypted DDIM step on a 4x64x64 latent (SD1.5 at 512 px), threshold {THRESHOLD}, median of "
          f"{len(updates)} steps, torch threads {args.threads}; naive timed on {args.naive_elements} elements "
          "and scaled to the selected count")
    print(f"{'':<58} {'ms/step':>10} {'max error':>10} {'encrypted':>10} {'MB/step':>8}")
    for name, seconds, error, share, sent in rows:
        megabytes = f"{sent / 1e6:8.2f}" if sent is not None else f"{'-':>8}"
        print(f"{name:<58} {seconds * 1e3:10.1f} {error:10.1e} {share:10.1%} {megabytes}")
    print("the worker's view of whole runs (small model, 4 images, 20 steps): its estimate of the final latent")
    print(f"{'':<58} {'PSNR dB':>10} {'knows seed':>10} {'guess 0':>10} {'exact':>10}")
    for label, value, seeded, baseline, exact in leaks:
        print(f"{label:<58} {value:10.1f} {seeded:10.1f} {baseline:10.1f} {exact:10.1%}")
    reference = rows[1][1]
    ours = rows[2][1]
    print(f"ratio reference-sparse/ours per-step HE overhead: {reference / ours:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
