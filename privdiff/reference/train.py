"""Train the small reference model and its style classifier from the public procedural data.

    python -m privdiff.reference.train [--out privdiff/models/small_weights] [--seed 0]

Stages: render the public images; train the VAE; encode the images and set the latent scale;
build the text encoder (frozen unless asked); train the UNet with offset noise (with an EMA of its
weights, which is what ships); train the classifier on all styles, private ones included (it is an
evaluation tool); train the same network on the public styles only as the model's public image encoder
(for DP style targets and guidance). Both networks are trained from the saved model's VAE with random
streams of their own, so ``--classifiers-only`` retrains just them next to a saved model. Everything is
seeded, so a rerun with the same seed and thread count rebuilds the same weights; other thread counts
give weights that pass the same checks. The UNet's state is saved in ``--out`` every few hundred steps:
rerunning an interrupted command redoes the short stages before it and resumes the UNet where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import atomic_write
from privdiff.models import small as ref
from privdiff.models.small_classifier import ENCODER_FILE, FILE, AttributeClassifier, save_classifier
from privdiff.reference.score import targets
from privdiff.reference.shapes import ALL_STYLES, PUBLIC_STYLES, public_dataset, random_specs, render

UNET_STEPS = 6000
"""UNet training steps of 64 images (docs/reference-model.md says what they cost)."""
CHECKPOINT = "unet-checkpoint.pt"
"""The UNet's training state in ``--out`` while it trains: rerunning the same command resumes from it."""
CHECKPOINT_EVERY = 250
"""UNet steps between two saves of :data:`CHECKPOINT`."""
REFINE_STEPS = 1500
"""Steps of the UNet's second stage, which adds cross-attention at 16x16 (``widened``)."""
REFINE_CHECKPOINT = "unet-refine-checkpoint.pt"
"""The second stage's training state in ``--out`` while it trains."""
REFINE_PEAK = 3e-4
"""Peak learning rate of the second stage (the first stage's is 5e-4)."""
OFFSET_NOISE = 0.3
"""Std of the per-image, per-channel constant added to the UNet's training noise (see ``train_unet``)."""


def _batches(n: int, size: int, steps: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` index batches drawn from shuffled passes over range(n)."""
    order = torch.randperm(n, generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + size]
        pos += size


def _lr(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_vae(images: torch.Tensor, steps: int, gen: torch.Generator) -> torch.nn.Module:
    """The KL autoencoder: L1 + MSE reconstruction, a light KL term."""
    vae = ref.vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    for step, idx in enumerate(tqdm(_batches(len(images), 32, steps, gen), total=steps, desc="vae", file=sys.stderr)):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 2e-3)
        x = images[idx] * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return vae.eval().requires_grad_(False)


def encode_latents(vae: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Posterior means of ``images``, unscaled."""
    with torch.no_grad():
        return torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(256)])


def caption_ids(tok, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids of every distinct caption [U, 77], each caption's row, and the row of "" (for CFG)."""
    unique = sorted(set(captions) | {""})
    rows = {c: i for i, c in enumerate(unique)}
    ids = tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    return ids, torch.tensor([rows[c] for c in captions]), rows[""]


def _states(encoder: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states [U, 77, 768] of the frozen ``encoder`` for token ids [U, 77]."""
    with torch.no_grad():
        return torch.cat([encoder(chunk).last_hidden_state for chunk in ids.split(64)])


def _ema(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).requires_grad_(False)


def widened(unet: torch.nn.Module, cross_attention: tuple[int, ...]) -> torch.nn.Module:
    """A UNet that also attends to the text at the latent sizes ``cross_attention`` and computes what ``unet``
    computes: ``unet``'s weights, and each added attention block's output projection zeroed (its residual
    connection then passes its input through unchanged)."""
    wide = ref.unet(cross_attention)
    missing, unexpected = wide.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(".attentions." not in name for name in missing):
        raise ValueError(f"cross_attention {cross_attention} does not extend this UNet's attention levels")
    with torch.no_grad():
        for name, param in wide.named_parameters():
            if name in missing and ".proj_out." in name:
                param.zero_()
    return wide


def train_unet(latents: torch.Tensor, ids: torch.Tensor, caption_rows: torch.Tensor, empty_row: int,
               encoder: torch.nn.Module, steps: int, gen: torch.Generator, *, train_text: bool = False,
               cross_attention: tuple[int, ...] = ref.CROSS_ATTENTION, offset_noise: float = OFFSET_NOISE,
               start: torch.nn.Module | None = None, peak: float = 5e-4, warmup: int = 200,
               batch: int = 64, drop: float = 0.1, checkpoint: Path | None = None,
               checkpoint_every: int = CHECKPOINT_EVERY) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Epsilon-prediction UNet on SD's schedule; captions dropped to "" with probability ``drop`` (for CFG).
    ``offset_noise`` adds a per-image, per-channel constant of that standard deviation to the noise, so that the
    mean of a noisy latent does not give its colours away and the UNet has to read them from the text.
    With ``train_text`` the text encoder learns with it; otherwise it stays frozen and each caption is encoded once.
    With ``start`` (a trained UNet) training continues from it, ``widened`` to ``cross_attention``; otherwise it
    starts from a seeded random initialisation. The learning rate warms up over ``warmup`` steps to ``peak``.

    With ``checkpoint`` (a file path) the state is saved there every ``checkpoint_every`` steps and a run
    resumes from it: the random draws of the steps already done are replayed without computing them, so a
    resumed run ends with the same weights as an uninterrupted one. The final state stays there too (a rerun
    returns it at once), for the caller to remove once what it trains next is saved.

    Returns the exponential moving averages (decay 0.998) of the UNet and of the text encoder.
    """
    unet = ref.unet(cross_attention) if start is None else widened(start, cross_attention)
    ema = _ema(unet)
    encoder.requires_grad_(train_text).train(train_text)
    text_ema = _ema(encoder) if train_text else encoder
    states = None if train_text else _states(encoder, ids)
    alphas = torch.from_numpy(np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)).float()
    groups = [{"params": list(unet.parameters()), "peak": peak}]
    if train_text:
        groups.append({"params": list(encoder.parameters()), "peak": 2e-4})
    opt = torch.optim.AdamW(groups, lr=5e-4, weight_decay=1e-2)
    models = {"unet": unet, "ema": ema, "encoder": encoder, "text_ema": text_ema, "opt": opt}
    done, saved_generator = _resume(checkpoint, models, steps) if checkpoint is not None else (0, None)
    pairs = [(ema, unet)] + ([(text_ema, encoder)] if train_text else [])
    bar = tqdm(_batches(len(latents), batch, steps, gen), total=steps, desc="unet", file=sys.stderr)
    for step, idx in enumerate(bar):
        x0 = latents[idx]
        rows = torch.where(torch.rand(len(idx), generator=gen) < drop, empty_row, caption_rows[idx])
        t = torch.randint(0, 1000, (len(idx),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        if offset_noise:
            noise = noise + offset_noise * torch.randn(*x0.shape[:2], 1, 1, generator=gen)
        if step < done:  # replayed draws of a resumed run
            if step == done - 1 and not torch.equal(gen.get_state(), saved_generator):
                raise PrivdiffError(f"{checkpoint} was saved by a run with other data or seed; remove it to start over")
            continue
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, group["peak"], warmup=warmup)
        cond = encoder(ids[rows]).last_hidden_state if train_text else states[rows]
        a = alphas[t].view(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, cond).sample
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, model in pairs:
                for e, p in zip(average.parameters(), model.parameters(), strict=True):
                    e.lerp_(p, 1 - decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            _save_checkpoint(checkpoint, models, step + 1, steps, gen)
    return ema.eval(), text_ema.eval().requires_grad_(False)


def _save_checkpoint(path: Path, models: dict, done: int, steps: int, gen: torch.Generator) -> None:
    """The training state after ``done`` of ``steps`` steps, written atomically (public data only)."""
    state = {name: model.state_dict() for name, model in models.items()}
    state.update(done=done, steps=steps, generator=gen.get_state())
    atomic_write(path, lambda tmp: torch.save(state, tmp), force=True)


def _resume(path: Path, models: dict, steps: int) -> tuple[int, torch.Tensor | None]:
    """Load ``path`` into ``models`` when it exists; returns the number of steps it holds (0 without one) and
    the random generator's state after them."""
    if not path.exists():
        return 0, None
    state = torch.load(path, weights_only=True)
    if state["steps"] != steps:
        raise PrivdiffError(f"{path} is a checkpoint of a {state['steps']}-step run, not {steps}; "
                            "remove it to start over")
    for name, model in models.items():
        model.load_state_dict(state[name])
    print(f"resuming the UNet from step {state['done']} ({path})", file=sys.stderr)
    return state["done"], state["generator"]


def train_classifier(vae: torch.nn.Module, count: int, steps: int, seed: int, gen: torch.Generator,
                     styles: tuple[str, ...] = ALL_STYLES) -> AttributeClassifier:
    """The attribute classifier on ``styles``; half of each batch is a VAE reconstruction, plus pixel noise,
    so it reads the model's samples as well as rendered images."""
    rng = np.random.default_rng([seed, 2] if styles == ALL_STYLES else [seed, 2, len(styles)])
    specs = random_specs(count, rng, styles=styles)
    images = torch.from_numpy(np.stack([render(s, rng) for s in specs])).permute(0, 3, 1, 2)
    labels = targets(specs)
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    for step, idx in enumerate(tqdm(_batches(count, 64, steps, gen), total=steps, desc="classifier",
                                    file=sys.stderr)):
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, 2e-3)
        x = images[idx]
        with torch.no_grad():
            half = len(x) // 2
            x[:half] = ((vae.decode(vae.encode(x[:half] * 2 - 1).latent_dist.sample(generator=gen)).sample + 1) / 2)
            x = (x + 0.03 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        logits = model(x)
        loss = sum(loss_fn(logits[name], labels[name][idx]) for name in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def train(out: Path, seed: int = 0, images: int = 16000, vae_steps: int = 800, unet_steps: int = UNET_STEPS,
          classifier_images: int = 8000, classifier_steps: int = 3000, *, train_text: bool = False,
          cross_attention: tuple[int, ...] = ref.CROSS_ATTENTION, offset_noise: float = OFFSET_NOISE,
          refine_steps: int = REFINE_STEPS, reuse: Path | None = None, refine: Path | None = None) -> dict[str, float]:
    """Train everything into ``out`` (a diffusers folder + classifier.safetensors); returns stage timings (s).

    The UNet trains in two stages: ``unet_steps`` with cross-attention at ``cross_attention``, then
    ``refine_steps`` more with cross-attention added at every level (``widened``), at a lower learning rate.
    With ``reuse`` (a trained model's folder) its VAE, classifier and image encoder are copied instead of
    trained: only the text side and the UNet are new (for comparing UNet configurations quickly). With
    ``refine`` (a trained model's folder) its UNet is the first stage and its other parts are reused: only
    the second stage runs.
    """
    reuse = refine or reuse
    base = ref.load_small(folder=reuse) if reuse is not None else None
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    timings, start = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal start
        timings[name] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        print(f"{name}: {timings[name]} s", file=sys.stderr)

    pixels, _, captions = public_dataset(images, seed)
    pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
    lap("data")
    if reuse is None:
        vae = train_vae(pixels, vae_steps, gen)
        raw = encode_latents(vae, pixels)
        with torch.no_grad():
            check = pixels[:256]
            recon = (vae.decode(raw[:256]).sample + 1) / 2
        print(f"vae reconstruction L1: {(recon - check).abs().mean():.4f}", file=sys.stderr)
        vae.register_to_config(scaling_factor=float(1 / raw.std()))
        vae = vae.half().float()  # what ships is fp16: train the rest against the rounded weights
    else:
        vae = base.vae.eval().requires_grad_(False)
    latents = encode_latents(vae, pixels) * vae.config.scaling_factor
    lap("vae")
    tok = ref.tokenizer()
    if refine is not None:
        encoder = base.text_encoder.eval().requires_grad_(False)
    else:
        torch.manual_seed(seed + 1)
        encoder = ref.text_encoder(tok)
    if not train_text:
        encoder = encoder.half().float()  # frozen: train the UNet against the fp16 weights that ship
    ids, rows, empty = caption_ids(tok, captions)
    lap("captions")
    torch.manual_seed(seed + 2)
    out.mkdir(parents=True, exist_ok=True)
    if refine is not None:
        unet = base.unet
    else:
        unet, encoder = train_unet(latents, ids, rows, empty, encoder, unet_steps, gen, train_text=train_text,
                                   cross_attention=cross_attention, offset_noise=offset_noise,
                                   checkpoint=out / CHECKPOINT)
        lap("unet")
    if refine_steps:
        unet, _ = train_unet(latents, ids, rows, empty, encoder, refine_steps, gen, cross_attention=ref.LEVELS,
                             offset_noise=offset_noise, start=unet, peak=REFINE_PEAK, warmup=50,
                             checkpoint=out / REFINE_CHECKPOINT)
        lap("unet refinement")
    ref.pipeline(tok, encoder, vae, unet).to(torch.float16).save_pretrained(out, safe_serialization=True)
    for name in (CHECKPOINT, REFINE_CHECKPOINT):
        (out / name).unlink(missing_ok=True)
    if reuse is not None:
        for name in (FILE, ENCODER_FILE):
            if not (out / name).exists() or not (out / name).samefile(reuse / name):
                shutil.copyfile(reuse / name, out / name)
        return timings
    timings.update(train_classifiers(out, seed, classifier_images, classifier_steps))
    return timings


def train_classifiers(folder: Path, seed: int = 0, count: int = 8000, steps: int = 3000,
                      encoder_count: int = 4000, encoder_steps: int = 600) -> dict[str, float]:
    """The style classifier (all styles) and the public image encoder (public styles only) next to the model
    saved in ``folder``, whose VAE reconstructions they learn to read; returns their training times (s)."""
    vae = ref.load_small(folder=folder).vae.eval().requires_grad_(False)
    timings = {}
    for name, file, styles, images, stage_steps, stream in (
            ("classifier", FILE, ALL_STYLES, count, steps, 3),
            ("encoder", ENCODER_FILE, PUBLIC_STYLES, encoder_count, encoder_steps, 1)):
        start = time.perf_counter()
        torch.manual_seed(seed)
        model = train_classifier(vae, images, stage_steps, seed, torch.Generator().manual_seed(seed + stream),
                                 styles=styles)
        save_classifier(model, folder, file)
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {timings[name]} s", file=sys.stderr)
    return timings


def _sizes(text: str) -> tuple[int, ...]:
    """``--cross-attention``: comma-separated latent sizes among the UNet's levels."""
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or not set(sizes) <= set(ref.LEVELS):
        raise argparse.ArgumentTypeError(f"comma-separated latent sizes among {ref.LEVELS}, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privdiff.reference.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ref.WEIGHTS, help="output folder (default: the shipped weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cross-attention", type=_sizes, default=ref.CROSS_ATTENTION,
                        help="latent sizes whose UNet blocks attend to the text, e.g. 8,4 (default: %(default)s)")
    parser.add_argument("--offset-noise", type=float, default=OFFSET_NOISE,
                        help="std of a per-channel constant added to the UNet's training noise (default: %(default)s)")
    parser.add_argument("--train-text-encoder", action="store_true", help="train the text encoder with the UNet")
    parser.add_argument("--refine-steps", type=int, default=REFINE_STEPS,
                        help="steps of the second UNet stage, cross-attention at every level (default: %(default)s)")
    parser.add_argument("--refine", type=Path, default=None,
                        help="run only the second UNet stage, from this trained model (its other parts are reused)")
    parser.add_argument("--reuse", type=Path, default=None,
                        help="copy this trained model's VAE, classifier and image encoder instead of training them")
    parser.add_argument("--classifiers-only", action="store_true",
                        help="only (re)train the style classifier and the public image encoder next to the model "
                             "saved in --out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.classifiers_only:
        timings = train_classifiers(args.out, seed=args.seed)
    else:
        timings = train(args.out, seed=args.seed, unet_steps=args.unet_steps, train_text=args.train_text_encoder,
                        cross_attention=args.cross_attention, offset_noise=args.offset_noise,
                        refine_steps=args.refine_steps, reuse=args.reuse, refine=args.refine)
    print(f"trained in {sum(timings.values()):.0f} s on {torch.get_num_threads()} threads: {timings}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
