"""``privdiff wavelet``: spectral DP generation from the command line (JSON on stdout, progress on stderr)."""

from __future__ import annotations

import argparse
import json

from privdiff.cli import arguments, releasing
from privdiff.errors import PrivdiffError


def _cmd_tokenizer(args: argparse.Namespace) -> None:
    from privdiff.wavelet.workflow import train_tokenizer

    tokenizer = train_tokenizer(args.images, args.out, size=args.size, base=args.base,
                                codebook_size=args.codebook_size, seed=args.seed, force=args.force)
    arguments.print_json({"output": args.out, "identity": tokenizer.identity, "size": tokenizer.size,
                          "tokens_per_image": tokenizer.length, "codebook_sizes": list(tokenizer.vocab_sizes)})


def train_config(args: argparse.Namespace) -> object:
    from privdiff.wavelet.training import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from privdiff.progress import tqdm_progress
    from privdiff.wavelet.tokenizer import load_tokenizer
    from privdiff.wavelet.workflow import pretrain_prior

    tokenizer = load_tokenizer(args.tokenizer)
    with tqdm_progress("pre-training") as progress:
        losses = pretrain_prior(tokenizer, args.images, args.out, train_config(args), dim=args.dim,
                                layers=args.layers, heads=args.heads, seed=args.seed, progress=progress,
                                force=args.force, device=args.device or "cpu", checkpoint_dir=args.checkpoint_dir)
    arguments.print_json({"output": args.out, "tokenizer": tokenizer.identity, "steps": len(losses),
                          "final_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4)})


def _cmd_finetune(args: argparse.Namespace) -> None:
    from privdiff.wavelet.workflow import finetune_ranks

    with releasing.joined_world(args) as world:
        if world.leader:
            with world.leading():
                summary = _lead_finetune(args, world)
            arguments.print_json(summary)
        else:
            finetune_ranks(world, device=world.device(args.device or "cpu"))
            world.finish(None)


def _lead_finetune(args: argparse.Namespace, world: object) -> dict:
    from privdiff.io.images import read_private_files
    from privdiff.progress import tqdm_progress
    from privdiff.release.dp_params import DPParams
    from privdiff.wavelet.workflow import default_checkpoint_dir, finetune_prior, plan_file, plan_folder

    if args.public_size is not None:
        raise PrivdiffError("--public-size does not apply to DP-SGD fine-tuning: it treats N as public (add-remove)")
    plan_file(args.out, args.force)  # the output and the checkpoint folder first, then the private images
    plan_folder(args.checkpoint_dir or default_checkpoint_dir(), "checkpoint folder")
    private = read_private_files(args.images)  # read once: the ledger charges the very bytes decoded
    rate = args.sample_rate if args.sample_rate is not None else min(1.0, args.batch_size / len(private))
    params = DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate, clip_norm=args.clip_norm,
                      accountant=args.accountant)
    ledger = releasing.ledger_request(args, private.digests)
    with tqdm_progress("DP fine-tuning") as progress:
        path, report, resumed = finetune_prior(
            args.prior, private, args.out, params, train_config(args), ledger=ledger,
            checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, seed=args.reproducible_seed,
            dataset_label=args.dataset_label, progress=progress, force=args.force,
            device=world.device(args.device or "cpu"), world=world)
    summary = {"output": str(path), "resumed": resumed, **json.loads(report.to_json())}
    if ledger is not None:
        summary["ledger"] = {"path": str(ledger.ledger.path), "release_id": report.release_id}
    return summary


def _cmd_sample(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    from privdiff.io.image_output import file_name, save_images
    from privdiff.io.images import check_memory
    from privdiff.progress import tqdm_progress
    from privdiff.wavelet.prior import load_prior
    from privdiff.wavelet.upsample import load_upscaler, refine, upscale
    from privdiff.wavelet.workflow import draw, plan_folder

    out_dir = plan_folder(args.out, "--out")  # every input is checked, and every image made, before it is created
    loaded = load_prior(args.prior)
    upscaler = load_upscaler(args.upscaler) if args.upscaler else None
    side = loaded.tokenizer.size * (int(getattr(upscaler, "scale", 1)) if upscaler is not None else args.scale)
    backend = None
    if args.refine_model:
        from privdiff.models.diffusers_backend import DiffusersBackend
        from privdiff.models.registry import load_model

        backend = DiffusersBackend(load_model(args.refine_model))
        backend.freeze()
        side = args.refine_size or backend.resolution
    check_memory(args.num_images, side)
    with tqdm_progress("sampling") as progress:
        coarse = draw(loaded, args.num_images, seed=args.seed, temperature=args.temperature, progress=progress)
    upsampled = coarse
    if upscaler is not None:
        upsampled = upscale(upsampled, upscaler)
    if backend is not None:
        upsampled = refine(backend, upsampled, args.refine_prompt, size=side, strength=args.strength,
                           steps=args.refine_steps, seed=args.seed)
    elif args.scale > 1 and upscaler is None:
        upsampled = F.interpolate(coarse, scale_factor=args.scale, mode="bicubic", align_corners=False).clamp(0, 1)
    settings = {"prior": file_name(args.prior), "seed": args.seed, "temperature": args.temperature,
                "prior_release_id": loaded.report.release_id if loaded.report else None}
    more = {"upscaler": file_name(args.upscaler), "refine_model": file_name(args.refine_model),
            "refine_prompt": args.refine_prompt, "strength": args.strength}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        result = {"coarse": [str(p) for p in save_images(coarse, out_dir, settings, prefix="coarse")]}
        if upsampled is not coarse:
            written = save_images(upsampled, out_dir, {**settings, **more}, prefix="upsampled")
            result["upsampled"] = [str(p) for p in written]
    except OSError as exc:
        raise PrivdiffError(f"cannot write the images in {out_dir}: {exc.strerror or exc}") from None
    arguments.print_json({**result, **settings})


def _cmd_inspect(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    from privdiff.wavelet.prior import load_prior

    loaded = load_prior(args.file)
    arguments.print_json({"file": args.file, "config": asdict(loaded.prior.config),
                          "tokenizer": loaded.tokenizer.identity, "size": loaded.tokenizer.size,
                          "privacy_report": json.loads(loaded.report.to_json()) if loaded.report else None})


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``wavelet`` command group."""
    group = sub.add_parser("wavelet", help="spectral DP generation: a DP prior over coarse Haar-wavelet tokens")
    wavelet = group.add_subparsers(dest="wavelet_command", metavar="SUBCOMMAND", required=True)
    steps, batch = arguments.integer(1, arguments.MAX_STEPS), arguments.integer(1, arguments.MAX_BATCH_SIZE)

    p = wavelet.add_parser("tokenizer", help="learn the per-scale codebooks from a PUBLIC image folder")
    p.add_argument("--images", required=True, help="folder of public images (at least --size pixels)")
    p.add_argument("--out", required=True, help="tokenizer file (.safetensors)")
    p.add_argument("--size", type=arguments.integer(2, 1024), default=32, help="coarse resolution, a power of 2 (32)")
    p.add_argument("--base", type=arguments.integer(1, 64), default=4, help="side of the coarsest band (4)")
    p.add_argument("--codebook-size", type=arguments.integer(2, 65536), default=256, help="codes per scale (256)")
    p.add_argument("--seed", type=arguments.integer(0, arguments.MAX_SEED), default=0,
                   help="k-means seed (public data)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_cmd_tokenizer)

    p = wavelet.add_parser("pretrain", help="pre-train the autoregressive prior on a PUBLIC image folder")
    p.add_argument("--tokenizer", required=True, help="tokenizer file")
    p.add_argument("--images", required=True, help="folder of public images")
    p.add_argument("--out", required=True, help="prior file (.safetensors); it holds the tokenizer too")
    p.add_argument("--steps", type=steps, default=2000, help="optimiser steps (2000)")
    p.add_argument("--batch-size", type=batch, default=32, help="batch size (32)")
    p.add_argument("--lr", type=arguments.real(arguments.MAX_LR), default=3e-4, help="learning rate (3e-4)")
    p.add_argument("--dim", type=arguments.integer(8, 4096), default=128, help="transformer width (128)")
    p.add_argument("--layers", type=arguments.integer(1, 64), default=4, help="transformer blocks (4)")
    p.add_argument("--heads", type=arguments.integer(1, 64), default=4, help="attention heads (4)")
    p.add_argument("--seed", type=arguments.integer(0, arguments.MAX_SEED), default=0, help="seed (public data)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="folder for resumable state (default ~/.cache/privdiff/checkpoints): the same command run "
                        "again after an interruption continues where it stopped")
    p.add_argument("--device", type=arguments.device, default=None, help="torch device (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_cmd_pretrain)

    p = wavelet.add_parser("finetune", help="DP-SGD fine-tune of a public prior on a PRIVATE folder (the release)")
    add_finetune_arguments(p)
    p.set_defaults(func=_cmd_finetune, across_ranks=True)

    p = wavelet.add_parser("sample", help="coarse samples from a prior, optionally upsampled by a public model")
    p.add_argument("--prior", required=True, help="prior file (public or DP)")
    p.add_argument("--num-images", type=arguments.integer(1, 1024), default=8, help="images (8)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=arguments.integer(0, arguments.MAX_SEED), default=0, help="sampling seed (0)")
    p.add_argument("--temperature", type=arguments.real(100), default=1.0, help="sampling temperature (1.0)")
    p.add_argument("--upscaler", default=None, help="a super-resolution model file spandrel reads (ESRGAN, ...)")
    p.add_argument("--scale", type=arguments.integer(1, 16), default=1,
                   help="without an upscaler or SD model: bicubic factor for the upsampled copies")
    p.add_argument("--refine-model", type=arguments.model, default=None, help="an SD model for an img2img pass")
    p.add_argument("--refine-prompt", default="", help="prompt of the img2img pass")
    p.add_argument("--refine-size", type=arguments.resolution, default=None, help="img2img size (the model's)")
    p.add_argument("--refine-steps", type=arguments.integer(1, 1000), default=30, help="img2img DDIM steps (30)")
    p.add_argument("--strength", type=arguments.real(1.0), default=0.5, help="img2img strength in (0, 1] (0.5)")
    p.set_defaults(func=_cmd_sample)

    p = wavelet.add_parser("inspect", help="config, tokenizer and privacy report of a prior file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_inspect)


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    """``wavelet finetune``'s options (``privdiff audit wavelet-finetune`` takes the same)."""
    steps, batch = arguments.integer(1, arguments.MAX_STEPS), arguments.integer(1, arguments.MAX_BATCH_SIZE)
    p.add_argument("--prior", required=True, help="the public prior file")
    p.add_argument("--images", required=True, help="folder of private images (one image = one example)")
    p.add_argument("--out", required=True, help="DP prior file (.safetensors, carries the privacy report)")
    p.add_argument("--epsilon", type=arguments.POSITIVE, required=True, help="target epsilon of this release")
    p.add_argument("--delta", type=arguments.UNIT_OPEN, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--steps", type=steps, default=300, help="DP-SGD steps (300)")
    p.add_argument("--batch-size", type=batch, default=32,
                   help="expected batch size; sets q = B/N unless --sample-rate is given (32)")
    p.add_argument("--sample-rate", type=arguments.RATE, default=None, help="Poisson sampling rate q")
    p.add_argument("--clip-norm", type=arguments.real(arguments.MAX_CLIP_NORM), default=1.0,
                   help="per-sample clip norm (1.0)")
    p.add_argument("--lr", type=arguments.real(arguments.MAX_LR), default=3e-4, help="learning rate (3e-4)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="private folder for resumable state (default ~/.cache/privdiff/checkpoints); running the "
                        "same command again after an interruption resumes without charging again")
    p.add_argument("--checkpoint-every", type=steps, default=50, help="steps between checkpoints (50)")
    arguments.add_accountant(p)
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    p.add_argument("--device", type=arguments.device, default=None, help="torch device (default cpu)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    arguments.add_ledger_options(p)
