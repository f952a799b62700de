"""``privdiff audit dpsgd-ti`` and ``privdiff audit wavelet-finetune``: one DP-SGD run with canaries, not a release.

Each takes its release command's options (copy the release's command line and insert ``audit``) plus --canaries and
--confidence; the options that only concern the output or the ledger are accepted and ignored.
"""

from __future__ import annotations

import argparse

from privdiff.cli import releasing, textual_inversion, wavelet
from privdiff.cli.audit_options import add_audit_parser, print_result
from privdiff.errors import PrivdiffError


def _cmd_dpsgd_ti(args: argparse.Namespace) -> None:
    from privdiff.audit.dpsgd_ti import audit_dpsgd_ti
    from privdiff.audit.plan import audit_params
    from privdiff.embeddings.dpsgd_ti import plan_dpsgd_ti
    from privdiff.embeddings.textual_inversion import TIConfig, check_config
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.privacy.distributed import World
    from privdiff.progress import tqdm_progress

    private = read_private_files(args.images, warn=False)
    if args.resolution is not None:
        check_memory(len(private) + args.canaries, args.resolution)
    config = TIConfig(n_vectors=args.vectors, init_word=args.init_word, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, templates=args.templates)
    # the release's own q (its default: batch size / N), so the run has the claim of the release audited
    params = releasing.dp_params(args, min(1.0, args.batch_size / len(private)) if args.sample_rate is None
                                 else args.sample_rate)
    if args.bound != "clip":
        raise PrivdiffError(f"--bound {args.bound} is not available for --method dpsgd (it clips gradients)")
    records = len(private) + args.canaries // 2
    plan_dpsgd_ti(audit_params(params, len(private), args.canaries), records, config)  # every check, before a model
    world = World()
    releasing.check_device_here(args, world)
    private.warn_skipped()
    with tqdm_progress("dpsgd audit: training") as progress:
        backend = releasing.load_backend(args, world)
        check_config(backend, config)
        resolution = backend.resolution if args.resolution is None else args.resolution
        check_memory(len(private) + args.canaries, resolution)
        images = private.load(resolution).images
        result = audit_dpsgd_ti(backend, images, params, config, args.canaries, confidence=args.confidence,
                                seed=args.reproducible_seed, dataset_label=args.dataset_label, progress=progress)
    print_result(result, args)


def _cmd_wavelet_finetune(args: argparse.Namespace) -> None:
    from privdiff.audit.wavelet_finetune import audit_wavelet_finetune
    from privdiff.io.images import read_private_files
    from privdiff.progress import tqdm_progress
    from privdiff.release.dp_params import DPParams
    from privdiff.wavelet.workflow import load_public_prior

    if args.public_size is not None:
        raise PrivdiffError("--public-size does not apply to DP-SGD fine-tuning: it treats N as public (add-remove)")
    load_public_prior(args.prior)  # a wrong prior fails before the private images are read
    private = read_private_files(args.images)
    rate = args.sample_rate if args.sample_rate is not None else min(1.0, args.batch_size / len(private))
    params = DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate, clip_norm=args.clip_norm,
                      accountant=args.accountant)
    with tqdm_progress("DP fine-tuning audit") as progress:
        result = audit_wavelet_finetune(args.prior, private, params, wavelet.train_config(args), args.canaries,
                                        confidence=args.confidence, seed=args.reproducible_seed,
                                        dataset_label=args.dataset_label, progress=progress,
                                        device=args.device or "cpu")
    print_result(result, args)


def add_commands(group: argparse._SubParsersAction) -> None:
    """``audit dpsgd-ti`` and ``audit wavelet-finetune`` in the ``audit`` group."""
    add_audit_parser(group, "dpsgd-ti", "audit ti-aggregate --method dpsgd: one run with canary images",
                     lambda p: textual_inversion.add_arguments(p, method=False), _cmd_dpsgd_ti)
    add_audit_parser(group, "wavelet-finetune", "audit wavelet finetune: one DP-SGD run with canary images",
                     wavelet.add_finetune_arguments, _cmd_wavelet_finetune)
