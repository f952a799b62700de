"""``privdiff audit aggregate | ti-aggregate | guidance-target``: the aggregate releases audited with canaries.

Each takes its release command's options, so a release's command line becomes an audit by inserting ``audit`` and
adding ``--canaries``; the options that write or charge (``--out``, ``--ledger``, ...) are ignored, with one line
saying so. Prints one JSON object (``privdiff.audit.result.AuditResult``).
"""

from __future__ import annotations

import argparse

from privdiff.cli import aggregate, guidance, releasing, textual_inversion
from privdiff.cli.audit_options import add_audit_parser, print_result
from privdiff.errors import PrivdiffError


def _check_audit(params: object, dataset_size: int, args: argparse.Namespace) -> None:
    """The release's own checks of its parameters, then the audited run's (δ below 1/(N + canaries))."""
    from privdiff.audit.plan import audit_params
    from privdiff.release.dp_params import check_params

    check_params(params, dataset_size)
    audit_params(params, dataset_size, args.canaries)


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from privdiff.audit.aggregates import audit_aggregate
    from privdiff.embeddings.dpagg import load_per_image_files, per_image_files
    from privdiff.embeddings.files import load_embedding

    if not args.one_image_per_file:
        raise PrivdiffError("the guarantee needs each file to come from exactly one image: confirm with "
                            "--one-image-per-file")
    files = per_image_files(args.embeddings)
    rate = 1.0 if args.sample_rate is None else args.sample_rate
    params = releasing.dp_params(args, rate, args.noise_multiplier)
    _check_audit(params, len(files), args)
    center = load_embedding(args.center) if args.center else None
    result = audit_aggregate(load_per_image_files(files, params), params, args.canaries, args.confidence,
                             center=center, seed=args.reproducible_seed)
    print_result(result, args)


def _cmd_ti_aggregate(args: argparse.Namespace) -> None:
    from privdiff.audit.aggregates import audit_dpagg_ti
    from privdiff.embeddings.textual_inversion import TIConfig, check_config
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.progress import tqdm_progress

    private = read_private_files(args.images, warn=False)
    config = TIConfig(n_vectors=args.vectors, init_word=args.init_word, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, templates=args.templates)
    params = releasing.dp_params(args, 1.0 if args.sample_rate is None else args.sample_rate)
    _check_audit(params, len(private), args)
    if args.resolution is not None:
        check_memory(len(private) + args.canaries, args.resolution)
    with releasing.joined_world(args) as world:
        backend = releasing.load_backend(args, world)
    check_config(backend, config)
    resolution = backend.resolution if args.resolution is None else args.resolution
    check_memory(len(private) + args.canaries, resolution)
    private.warn_skipped()
    images = private.load(resolution).images
    with tqdm_progress("audit: release run") as progress, tqdm_progress("audit: attack") as attack_progress:
        result = audit_dpagg_ti(backend, images, params, config, args.canaries, args.confidence,
                                seed=args.reproducible_seed, progress=progress, attack_progress=attack_progress)
    print_result(result, args)


def _cmd_guidance_target(args: argparse.Namespace) -> None:
    from privdiff.audit.aggregates import audit_style_target
    from privdiff.guidance.target import target_params
    from privdiff.io.devices import check_device
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.models.image_encoders import load_image_encoder
    from privdiff.progress import tqdm_progress

    private = read_private_files(args.images, warn=False)
    rate = 1.0 if args.sample_rate is None else args.sample_rate
    params = target_params(args.epsilon, args.delta, rate, accountant=args.accountant, public_size=args.public_size)
    _check_audit(params, len(private), args)
    encoder = load_image_encoder(args.image_encoder).to(check_device(args.device))
    check_memory(len(private) + args.canaries, encoder.size)
    private.warn_skipped()
    images = private.load(encoder.size).images
    with tqdm_progress("audit: release run") as progress:
        result = audit_style_target(encoder, images, params, args.canaries, args.confidence,
                                    seed=args.reproducible_seed, progress=progress)
    print_result(result, args)


def add_commands(group: argparse._SubParsersAction) -> None:
    """The audits of ``aggregate``, ``ti-aggregate`` (DPAgg-TI) and ``guidance target`` in the ``audit`` group."""
    add_audit_parser(group, "aggregate", "audit `privdiff aggregate` (canaries: per-image embedding offsets)",
                     aggregate.add_arguments, _cmd_aggregate, ignored=("images",))  # --images: what a ledger charges
    add_audit_parser(group, "ti-aggregate", "audit `privdiff ti-aggregate` with DPAgg-TI (canaries: mosaic images)",
                     lambda p: textual_inversion.add_arguments(p, method=False), _cmd_ti_aggregate)
    add_audit_parser(group, "guidance-target", "audit `privdiff guidance target` (canaries: mosaic images)",
                     guidance.add_target_arguments, _cmd_guidance_target)
