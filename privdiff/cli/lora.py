"""``privdiff lora``: a DP-LoRA style adapter (DP-SGD on the UNet's attention LoRA) from private images."""

from __future__ import annotations

import argparse
import json

from privdiff.cli import arguments, releasing
from privdiff.errors import PrivdiffError

MAX_RANK = 1024


def _cmd_lora(args: argparse.Namespace) -> None:
    with releasing.joined_world(args) as world:
        if world.leader:
            _lead_lora(args, world)
        else:
            from privdiff.lora.ranks import run_dp_lora_ranks

            run_dp_lora_ranks(world, lambda: releasing.load_backend(args, world))
            world.finish(None)


def _lead_lora(args: argparse.Namespace, world: object) -> None:
    from privdiff.io.images import read_private_files
    from privdiff.lora.ranks import run_dp_lora_ranks
    from privdiff.lora.release import local_trainer, plan_lora, plan_lora_file, release_lora
    from privdiff.lora.training import LoRAConfig
    from privdiff.progress import tqdm_progress
    from privdiff.release.dp_params import DPParams

    with world.leading():
        if args.public_size is not None:
            raise PrivdiffError("--public-size does not apply to DP-LoRA: DP-SGD treats N as public (add-remove)")
        plan_lora_file(args.out, args.force)  # the output first, then the private images, each read once
        private = read_private_files(args.images, warn=False)
        rate = args.sample_rate if args.sample_rate is not None else min(1.0, args.batch_size / len(private.files))
        params = DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate, clip_norm=args.clip_norm,
                          accountant=args.accountant)
        config = LoRAConfig(rank=args.rank, alpha=args.rank if args.alpha is None else args.alpha,
                            targets=args.targets, steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                            prompt=args.prompt)
        report = releasing.with_world(plan_lora(params, len(private.files), config, seed=args.reproducible_seed,
                                                dataset_label=args.dataset_label), world)
        releasing.check_device_here(args, world)
        ledger = releasing.ledger_request(args, private.digests)
        private.warn_skipped()
        with tqdm_progress("dp-lora: training") as progress:
            def load():
                return releasing.load_backend(args, world)

            if world.size > 1:
                def train(planned):
                    return run_dp_lora_ranks(world, load, private=private, resolution=args.resolution, params=params,
                                             config=config, seed=args.reproducible_seed, report=planned,
                                             progress=progress)
            else:
                train = local_trainer(load, lambda side: private.load(side).images, params, config,
                                      resolution=args.resolution, seed=args.reproducible_seed, progress=progress)
            path, result, reservation = release_lora(train, report, args.out, ledger=ledger, force=args.force)
    summary = {"output": str(path), **json.loads(result.report.to_json())}
    if reservation is not None:
        summary["ledger"] = {"path": str(reservation.ledger.path), "release_id": reservation.release_id}
    arguments.print_json(summary)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``lora`` command."""
    p = sub.add_parser("lora", help="DP-LoRA style adapter from a folder of private images")
    p.add_argument("--model", type=arguments.model, required=True,
                   help="local diffusers folder, local single-file SD1.x/SD2.x/SDXL checkpoint, 'small', 'tiny' or "
                   "'tiny-sdxl'")
    p.add_argument("--images", required=True, help="folder of private images (png, jpg, webp, ...)")
    p.add_argument("--out", required=True, help="output LoRA file (.safetensors; ComfyUI, A1111 and diffusers load it)")
    p.add_argument("--epsilon", type=arguments.POSITIVE, required=True, help="target epsilon of this release")
    p.add_argument("--delta", type=arguments.UNIT_OPEN, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--sample-rate", type=arguments.RATE, default=None,
                   help="Poisson sampling rate q (default batch-size/N)")
    p.add_argument("--clip-norm", type=arguments.real(arguments.MAX_CLIP_NORM), default=1.0,
                   help="per-image gradient clip norm C (default 1.0)")
    arguments.add_accountant(p)
    p.add_argument("--rank", type=arguments.integer(1, MAX_RANK), default=4, help="adapter rank (default 4)")
    p.add_argument("--alpha", type=arguments.real(1e6), default=None, help="adapter alpha (default: the rank)")
    p.add_argument("--targets", choices=["attn", "attn-ff"], default="attn",
                   help="attn: the attention projections (default); attn-ff: also the feed-forward layers")
    p.add_argument("--steps", type=arguments.integer(1, arguments.MAX_STEPS), default=200,
                   help="DP-SGD steps (default 200)")
    p.add_argument("--batch-size", type=arguments.integer(1, arguments.MAX_BATCH_SIZE), default=16,
                   help="expected images per step, and the most per gradient microbatch (default 16)")
    p.add_argument("--lr", type=arguments.real(arguments.MAX_LR), default=1e-3,
                   help="Adam learning rate (default 1e-3)")
    p.add_argument("--prompt", default="", help="the public prompt every image is trained with (default: empty)")
    p.add_argument("--resolution", type=arguments.resolution, default=None,
                   help="training resolution in pixels (default: the model's)")
    p.add_argument("--device", type=arguments.device, default=None,
                   help="torch device: cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="model weights dtype (default float32; the adapters train in float32)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    arguments.add_ledger_options(p)
    p.set_defaults(func=_cmd_lora, across_ranks=True)
