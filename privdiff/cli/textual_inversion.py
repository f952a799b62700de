"""``privdiff ti-aggregate``: a DP textual-inversion embedding (DPAgg-TI or DP-SGD) from private images."""

from __future__ import annotations

import argparse

from privdiff.cli import arguments, releasing
from privdiff.errors import PrivdiffError


def _cmd_ti_aggregate(args: argparse.Namespace) -> None:
    with releasing.joined_world(args) as world:
        if world.leader:
            _lead_ti_aggregate(args, world)
        else:
            from privdiff.embeddings.ranks import run_dpagg_ti_ranks, run_dpsgd_ti_ranks

            run = run_dpsgd_ti_ranks if args.method == "dpsgd" else run_dpagg_ti_ranks
            run(world, lambda: releasing.load_backend(args, world))
            world.finish(None)


def _lead_ti_aggregate(args: argparse.Namespace, world: object) -> None:
    from privdiff.embeddings.methods import METHODS, PLANS
    from privdiff.embeddings.ranks import run_dpagg_ti_ranks, run_dpsgd_ti_ranks
    from privdiff.embeddings.release import release_embedding
    from privdiff.embeddings.textual_inversion import TIConfig, check_config
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.progress import tqdm_progress
    from privdiff.release.dp_params import check_params

    with world.leading():
        output = releasing.planned_output(args)
        # Each file read once, before a model loads: an empty folder, a corrupt or oversized header or a duplicated
        # image fails now, and the ledger charges the digests of the very bytes decoded after the charge.
        private = read_private_files(args.images, warn=False)
        files = private.files
        if args.resolution is not None:
            check_memory(len(files), args.resolution)
        config = TIConfig(n_vectors=args.vectors, init_word=args.init_word, steps=args.steps, lr=args.lr,
                          batch_size=args.batch_size, templates=args.templates)
        default_rate = 1.0 if args.method == "dpagg" else min(1.0, args.batch_size / len(files))
        rate = default_rate if args.sample_rate is None else args.sample_rate  # --sample-rate 0 is refused
        params = releasing.dp_params(args, rate)
        check_params(params, len(files), n_public_by_convention=args.method == "dpsgd")
        if args.method == "dpsgd" and args.bound != "clip":
            raise PrivdiffError(f"--bound {args.bound} is not available for --method dpsgd (it clips gradients)")
        releasing.check_device_here(args, world)
        ledger = releasing.ledger_request(args, private.digests)
        report = releasing.with_world(PLANS[args.method](params, len(files), config, seed=args.reproducible_seed,
                                                         dataset_label=args.dataset_label), world)
        private.warn_skipped()  # every check passed: the warning comes before the work, never before an error

        def produce() -> object:  # runs once the release is charged
            with tqdm_progress(f"{args.method}: training") as progress:
                if world.size > 1:
                    run = run_dpsgd_ti_ranks if args.method == "dpsgd" else run_dpagg_ti_ranks
                    return run(world, lambda: releasing.load_backend(args, world), private=private,
                               resolution=args.resolution, params=params, config=config,
                               seed=args.reproducible_seed, report=report, progress=progress)
                backend = releasing.load_backend(args, world)
                check_config(backend, config)  # --vectors against the model's text context, before any image is decoded
                # checked by arguments.resolution
                resolution = backend.resolution if args.resolution is None else args.resolution
                images = private.load(resolution).images
                return METHODS[args.method](backend, images, params, config, seed=args.reproducible_seed,
                                            dataset_label=args.dataset_label, progress=progress, report=report)

        path, result, reservation = release_embedding(produce, report, output, ledger)
    arguments.print_json(releasing.summary(path, result, reservation))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``ti-aggregate`` command."""
    p = sub.add_parser("ti-aggregate", help="DP textual-inversion embedding from a folder of private images")
    add_arguments(p, method=True)
    p.set_defaults(func=_cmd_ti_aggregate, across_ranks=True)


def add_arguments(p: argparse.ArgumentParser, method: bool) -> None:
    """``ti-aggregate``'s options (``--method`` only when ``method``: ``privdiff audit`` names the method)."""
    p.add_argument("--model", type=arguments.model, required=True,
                   help="local diffusers folder, local single-file SD1.x/SD2.x/SDXL checkpoint, 'small' (the shipped "
                   "reference model), 'tiny' or 'tiny-sdxl' (random weights)")
    p.add_argument("--images", required=True, help="folder of private images (png, jpg, webp, ...)")
    if method:
        p.add_argument("--method", choices=["dpagg", "dpsgd"], default="dpagg",
                       help="dpagg: noisy aggregate of per-image embeddings (default); dpsgd: DP-SGD baseline")
    arguments.add_release_options(p, "1.0 for dpagg, batch-size/N for dpsgd")
    p.add_argument("--vectors", type=arguments.integer(1, arguments.MAX_VECTORS), default=1,
                   help="vectors per token (default 1; the model's text context allows fewer with long templates)")
    p.add_argument("--init-word", type=arguments.word, default="style", help="public word the embedding starts from")
    p.add_argument("--templates", choices=["style", "object"], default="style", help="prompt templates")
    p.add_argument("--steps", type=arguments.integer(1, arguments.MAX_STEPS), default=200,
                   help="optimiser steps per embedding (default 200)")
    p.add_argument("--lr", type=arguments.real(arguments.MAX_LR), default=5e-3,
                   help="Adam learning rate (default 5e-3)")
    p.add_argument("--batch-size", type=arguments.integer(1, arguments.MAX_BATCH_SIZE), default=8,
                   help="images trained together (default 8)")
    p.add_argument("--resolution", type=arguments.resolution, default=None,
                   help="training resolution in pixels, 8 to 4096 (default: the model's)")
    p.add_argument("--device", type=arguments.device, default=None,
                   help="torch device: cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="model weights dtype (default float32)")
