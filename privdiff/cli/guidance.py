"""``privdiff guidance``: DP style targets and universal-guidance sampling."""

from __future__ import annotations

import argparse
import json

from privdiff.cli import arguments, releasing
from privdiff.errors import PrivdiffError


def _target_out(path: str, force: bool) -> object:
    """Check a target output path before any work: .safetensors, an existing folder, no file unless ``force``."""
    from pathlib import Path

    out = Path(path).expanduser()
    if out.suffix != ".safetensors":
        raise PrivdiffError(f"--out {out} must end in .safetensors")
    if out.is_dir() or (out.exists() and not force):
        raise PrivdiffError(f"{out} already exists; pass --force to overwrite it" if not out.is_dir()
                            else f"--out {out} is a directory")
    if not out.parent.is_dir():
        raise PrivdiffError(f"output folder {out.parent} does not exist")
    return out


def _cmd_guidance_target(args: argparse.Namespace) -> None:
    from privdiff.guidance.target import make_target_ranks

    with releasing.joined_world(args) as world:
        if world.leader:
            with world.leading():
                summary = _lead_guidance_target(args, world)
            arguments.print_json(summary)
        else:
            make_target_ranks(world, lambda: _encoder(args, world))
            world.finish(None)


def _encoder(args: argparse.Namespace, world: object) -> object:
    """``--image-encoder`` on this rank's device."""
    from privdiff.models.image_encoders import load_image_encoder

    return load_image_encoder(args.image_encoder).to(releasing.check_device_here(args, world))


def _lead_guidance_target(args: argparse.Namespace, world: object) -> dict:
    from privdiff.embeddings.dpagg import expected_snr
    from privdiff.guidance.target import make_target, make_target_ranks, plan_target, save_target, target_params
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.progress import tqdm_progress
    from privdiff.release.artifact import carries_release, release_artifact
    from privdiff.release.dp_params import check_params

    out = _target_out(args.out, args.force)
    private = read_private_files(args.images, warn=False)  # read once: the ledger charges the bytes decoded below
    files = private.files
    rate = 1.0 if args.sample_rate is None else args.sample_rate
    params = target_params(args.epsilon, args.delta, rate, accountant=args.accountant, public_size=args.public_size)
    check_params(params, len(files))
    releasing.check_device_here(args, world)
    ledger = releasing.ledger_request(args, private.digests)
    encoder = _encoder(args, world)  # public: loaded before the charge, to name it
    size = encoder.size
    check_memory(len(files), size)
    report = releasing.with_world(plan_target(params, len(files), encoder.identity, seed=args.reproducible_seed,
                                              dataset_label=args.dataset_label), world)
    private.warn_skipped()  # every check passed: the warnings come before the work, never before an error
    expected_snr(report.public_size, rate, report.noise_multiplier, encoder.dim)

    def produce() -> object:
        with tqdm_progress("target: embedding") as progress:
            if world.size > 1:
                return make_target_ranks(world, lambda: encoder, encoder=encoder, private=private, params=params,
                                         seed=args.reproducible_seed, report=report, progress=progress)
            images = private.load(size).images
            return make_target(encoder, images, params, seed=args.reproducible_seed, report=report,
                               progress=progress)

    path, target, reservation = release_artifact(
        produce, report, out, lambda t: save_target(t, out, force=args.force), carries_release, ledger)
    summary = {"output": str(path), "image_encoder": target.encoder, **json.loads(target.report.to_json())}
    if reservation is not None:
        summary["ledger"] = {"path": str(reservation.ledger.path), "release_id": reservation.release_id}
    return summary


def _cmd_guidance_sample(args: argparse.Namespace) -> None:
    import torch

    from privdiff.guidance.sampler import GuidanceConfig, check_sample_memory, decoder_channels, sample_images
    from privdiff.guidance.target import check_encoder, load_target
    from privdiff.io.devices import check_device
    from privdiff.io.image_output import save_images
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.image_encoders import load_image_encoder
    from privdiff.models.registry import load_model
    from privdiff.progress import tqdm_progress

    config = GuidanceConfig(steps=args.steps, cfg=args.cfg, weight=args.guidance_weight, recurrence=args.recurrence)
    out_dir = arguments.out_dir(args.out)  # checked, created only when the images are written
    device = check_device(args.device)
    if args.height and args.width:  # a lower bound before the model loads; the model's decoder refines it below
        check_sample_memory(args.num_images, args.height, args.width, device=device)
    target = load_target(args.target)
    encoder = load_image_encoder(args.image_encoder)
    check_encoder(target, encoder, args.target, args.image_encoder)
    backend = DiffusersBackend(load_model(args.model, device=device, dtype=getattr(torch, args.dtype)))
    backend.freeze()
    height, width = args.height or backend.resolution, args.width or backend.resolution
    check_sample_memory(args.num_images, height, width, decoder_channels(backend), device)
    encoder.to(device)
    with tqdm_progress("guided sampling") as progress:
        images = sample_images(backend, args.prompt, args.negative_prompt, args.num_images, (height, width), config,
                               args.seed, encoder, target.vector, progress, vae_factor=backend.pipe.vae_scale_factor)
    settings = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "seed": args.seed,
                "steps": config.steps, "cfg": config.cfg, "guidance_weight": config.weight,
                "recurrence": config.recurrence, "target_release_id": target.report.release_id}
    written = save_images(images, out_dir, settings)
    arguments.print_json({"images": [str(p) for p in written], **settings,
                 "target_epsilon": target.report.epsilon, "target_delta": target.report.delta})


def _cmd_guidance_inspect(args: argparse.Namespace) -> None:
    from privdiff.guidance.target import load_target

    target = load_target(args.file)
    arguments.print_json({"file": args.file, "dim": int(target.vector.numel()), "image_encoder": target.encoder,
                 "privacy_report": json.loads(target.report.to_json())})


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``guidance`` command group."""
    guidance = sub.add_parser("guidance", help="DP style targets and universal-guidance sampling").add_subparsers(
        dest="guidance_command", metavar="SUBCOMMAND", required=True
    )
    p = guidance.add_parser("target", help="DP style target: noisy mean of the images' unit CLIP embeddings")
    add_target_arguments(p)
    p.set_defaults(func=_cmd_guidance_target, across_ranks=True)
    p = guidance.add_parser("sample", help="sample with universal guidance toward a style target")
    p.add_argument("--model", type=arguments.model, required=True, help="as for ti-aggregate")
    p.add_argument("--target", required=True, help="style target file from `privdiff guidance target`")
    p.add_argument("--image-encoder", required=True, help="the encoder the target was made with")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--out", required=True, help="output folder for the PNG images (created if missing)")
    p.add_argument("--guidance-weight", type=arguments.real(1e6, zero=True), default=6.0,
                   help="w: strength of the pull toward the target (default 6; 0 turns guidance off)")
    p.add_argument("--recurrence", type=arguments.integer(1, 100), default=6,
                   help="k: passes per step (self-recurrence; default 6; cost grows k-fold)")
    p.add_argument("--steps", type=arguments.integer(1, 1000), default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg", type=arguments.real(100), default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--seed", type=arguments.integer(0, arguments.MAX_SEED), default=0, help="sampling seed (default 0)")
    arguments.add_sampling_options(p)
    p.set_defaults(func=_cmd_guidance_sample)
    p = guidance.add_parser("inspect", help="encoder, width and privacy report of a style target file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_guidance_inspect)


def add_target_arguments(p: argparse.ArgumentParser) -> None:
    """``guidance target``'s options (``privdiff audit guidance-target`` takes them too)."""
    p.add_argument("--images", required=True, help="folder of private images")
    p.add_argument("--image-encoder", required=True,
                   help="transformers CLIP vision folder, ARCH:FILE for open_clip (e.g. RN50:RN50.pt), 'small' "
                   "(the small reference model's) or 'tiny'")
    p.add_argument("--out", required=True, help="target file (.safetensors)")
    p.add_argument("--epsilon", type=arguments.POSITIVE, required=True, help="target epsilon of this release")
    p.add_argument("--delta", type=arguments.UNIT_OPEN, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--sample-rate", type=arguments.RATE, default=None, help="Poisson sampling rate q (default 1.0)")
    arguments.add_accountant(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    arguments.add_ledger_options(p)
    p.add_argument("--device", type=arguments.device, default=None, help="torch device for the image encoder")
