"""The ``privdiff`` command: a thin front over the library; JSON on stdout, one-line errors on stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from privdiff.errors import PrivdiffError


def _print_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _cmd_privacy_epsilon(args: argparse.Namespace) -> None:
    from privdiff.privacy.accountants import epsilon_for

    name, eps = epsilon_for(
        args.noise_multiplier, args.sample_rate, args.steps, args.delta, accountant=args.accountant
    )
    _print_json({"epsilon": eps, "delta": args.delta, "accountant": name})


def _cmd_privacy_sigma(args: argparse.Namespace) -> None:
    from privdiff.privacy.accountants import calibrate_noise_multiplier

    name, sigma = calibrate_noise_multiplier(
        args.epsilon, args.delta, args.sample_rate, args.steps, accountant=args.accountant
    )
    _print_json(
        {
            "noise_multiplier": sigma,
            "epsilon": args.epsilon,
            "delta": args.delta,
            "sample_rate": args.sample_rate,
            "steps": args.steps,
            "accountant": name,
        }
    )


def _cmd_embedding_inspect(args: argparse.Namespace) -> None:
    from privdiff.embeddings.files import inspect_embedding

    _print_json(inspect_embedding(args.file))


def _cmd_embedding_convert(args: argparse.Namespace) -> None:
    from privdiff.embeddings.files import convert_embedding

    out = convert_embedding(args.input, args.output, fmt=args.format, token=args.token, force=args.force)
    _print_json({"written": str(out), "format": args.format})


def _ledger_entry(args: argparse.Namespace, files: list) -> object:
    """The LedgerEntry for ``--ledger`` (setting the budget when one is given), or None."""
    if not args.ledger:
        return None
    from privdiff.embeddings.release import open_ledger

    budget_delta = args.delta if args.budget_delta is None else args.budget_delta  # 0 is refused, not replaced
    return open_ledger(args.ledger, files, budget_epsilon=args.budget_epsilon,
                       budget_delta=budget_delta, force=args.force_budget,
                       accountant=args.accountant)


def _output(args: argparse.Namespace) -> object:
    from pathlib import Path

    from privdiff.embeddings.release import Output

    fmt = args.format or ("a1111-pt" if str(args.out).endswith(".pt") else "safetensors")
    return Output(Path(args.out), fmt=fmt, token=args.token, force=args.force)


def _summary(path: object, result: object, ledger: object) -> dict:
    report = result.report
    summary = {"output": str(path), **json.loads(report.to_json())}
    if result.expected_snr is not None:
        summary["expected_snr_best_case"] = round(result.expected_snr, 3)
    if ledger is not None:
        name, spent = ledger.ledger.spent(ledger.fingerprint)
        summary["ledger"] = {"path": str(ledger.ledger.path), "spent_epsilon": spent, "accountant": name}
    return summary


def _cmd_ti_aggregate(args: argparse.Namespace) -> None:
    import torch

    from privdiff.backends.diffusers_backend import DiffusersBackend
    from privdiff.backends.tiny import load_model
    from privdiff.embeddings.dpagg import DPParams
    from privdiff.embeddings.release import release_embedding
    from privdiff.embeddings.textual_inversion import TIConfig
    from privdiff.images import list_images, load_image_folder
    from privdiff.progress import tqdm_progress
    from privdiff.training import METHODS

    list_images(args.images)  # fail on an empty or missing folder before loading a model
    config = TIConfig(n_vectors=args.vectors, init_word=args.init_word, steps=args.steps, lr=args.lr,
                      batch_size=args.batch_size, templates=args.templates)
    output, device = _output(args), args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = DiffusersBackend(load_model(args.model, device=device, dtype=getattr(torch, args.dtype)))
    backend.freeze()
    files, images = load_image_folder(args.images, args.resolution or backend.resolution)
    default_rate = 1.0 if args.method == "dpagg" else min(1.0, args.batch_size / len(files))
    rate = default_rate if args.sample_rate is None else args.sample_rate  # --sample-rate 0 is refused
    params = DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate,
                      clip_norm=args.clip_norm, bound=args.bound, accountant=args.accountant)
    ledger = _ledger_entry(args, files)
    with tqdm_progress(f"{args.method}: training") as progress:
        path, result = release_embedding(
            lambda check: METHODS[args.method](
                backend, images, params, config, seed=args.reproducible_seed,
                dataset_label=args.dataset_label, progress=progress, before_training=check,
            ),
            output, ledger,
        )
    _print_json(_summary(path, result, ledger))


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from privdiff.embeddings.dpagg import DPParams, aggregate_embedding_files, per_image_files
    from privdiff.embeddings.files import load_embedding
    from privdiff.embeddings.release import release_embedding

    files = per_image_files(args.embeddings, args.one_image_per_file)
    rate = 1.0 if args.sample_rate is None else args.sample_rate  # --sample-rate 0 is refused
    params = DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate,
                      clip_norm=args.clip_norm, bound=args.bound, accountant=args.accountant,
                      noise_multiplier=args.noise_multiplier)
    center = load_embedding(args.center) if args.center else None
    ledger = _ledger_entry(args, files)
    path, result = release_embedding(
        lambda check: aggregate_embedding_files(
            files, params, center=center, seed=args.reproducible_seed,
            dataset_label=args.dataset_label, before_training=check,
        ),
        _output(args), ledger,
    )
    _print_json(_summary(path, result, ledger))


def _add_accountant(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accountant",
        choices=["pld", "prv", "rdp"],
        default=None,
        help="privacy accountant (default: the tightest sound one installed: pld, else prv)",
    )


def _add_release_options(p: argparse.ArgumentParser, rate_default: str, epsilon_required: bool = True) -> None:
    """Privacy, output and ledger options shared by the commands that release an embedding."""
    p.add_argument("--out", required=True, help="output embedding file (.safetensors or .pt)")
    p.add_argument("--epsilon", type=float, required=epsilon_required, help="target epsilon of this release")
    p.add_argument("--delta", type=float, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--sample-rate", type=float, default=None, help=f"Poisson sampling rate q (default {rate_default})")
    p.add_argument("--clip-norm", type=float, default=1.0, help="bound C on each image's contribution (default 1.0)")
    p.add_argument("--bound", choices=["clip", "normalize"], default="clip",
                   help="clip: scale longer vectors down to C; normalize: scale all to exactly C")
    _add_accountant(p)
    p.add_argument("--format", choices=["safetensors", "a1111-pt", "diffusers"], default=None,
                   help="file format (default: from the extension; safetensors loads everywhere)")
    p.add_argument("--token", default=None, help="token name stored in the file (default: output stem)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    p.add_argument("--ledger", default=None, help="budget ledger JSON file (kept by you, never shipped)")
    p.add_argument("--budget-epsilon", type=float, default=None, help="set the dataset's total epsilon budget")
    p.add_argument("--budget-delta", type=float, default=None, help="the budget's delta (default: --delta)")
    p.add_argument("--force-budget", action="store_true", help="release even over the ledger's budget")
    p.add_argument("--reproducible-seed", type=int, default=None,
                   help="fixed seed for debugging: the release is marked NOT private")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the CLI reference)."""
    parser = argparse.ArgumentParser(prog="privdiff", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    privacy = sub.add_parser("privacy", help="ask the privacy accountant").add_subparsers(
        dest="privacy_command", metavar="SUBCOMMAND", required=True
    )
    p = privacy.add_parser("epsilon", help="epsilon spent by the subsampled Gaussian mechanism")
    p.add_argument("--noise-multiplier", type=float, required=True, help="sigma (noise std / clip norm)")
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=int, required=True, help="number of compositions T")
    p.add_argument("--delta", type=float, required=True)
    _add_accountant(p)
    p.set_defaults(func=_cmd_privacy_epsilon)

    p = privacy.add_parser("sigma", help="noise multiplier that reaches a target (epsilon, delta)")
    p.add_argument("--epsilon", type=float, required=True)
    p.add_argument("--delta", type=float, required=True)
    p.add_argument("--sample-rate", type=float, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=int, required=True, help="number of compositions T")
    _add_accountant(p)
    p.set_defaults(func=_cmd_privacy_sigma)

    emb = sub.add_parser("embedding", help="inspect and convert embedding files").add_subparsers(
        dest="embedding_command", metavar="SUBCOMMAND", required=True
    )
    p = emb.add_parser("inspect", help="format, tensors, model family and privacy report of a file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_embedding_inspect)

    p = emb.add_parser("convert", help="convert between safetensors, A1111 .pt and diffusers formats")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument(
        "--format", choices=["safetensors", "a1111-pt", "diffusers"], default="safetensors",
        help="output format (default: safetensors, which ComfyUI, A1111 and diffusers all load)",
    )
    p.add_argument("--token", default=None, help="token name stored in the file (default: output stem)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_cmd_embedding_convert)

    p = sub.add_parser("ti-aggregate", help="DP textual-inversion embedding from a folder of private images")
    p.add_argument("--model", required=True,
                   help="local diffusers folder, local single-file SD1.x/SDXL checkpoint, 'tiny' or 'tiny-sdxl'")
    p.add_argument("--images", required=True, help="folder of private images (png, jpg, webp, ...)")
    p.add_argument("--method", choices=["dpagg", "dpsgd"], default="dpagg",
                   help="dpagg: noisy aggregate of per-image embeddings (default); dpsgd: DP-SGD baseline")
    _add_release_options(p, "1.0 for dpagg, batch-size/N for dpsgd")
    p.add_argument("--vectors", type=int, default=1, help="vectors per token (default 1)")
    p.add_argument("--init-word", default="style", help="public word the embedding starts from")
    p.add_argument("--templates", choices=["style", "object"], default="style", help="prompt templates")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps per embedding (default 200)")
    p.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--batch-size", type=int, default=8, help="images trained together (default 8)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: model's)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="model weights dtype (default float32)")
    p.set_defaults(func=_cmd_ti_aggregate)

    p = sub.add_parser("aggregate", help="DP aggregate of per-image embedding files trained elsewhere")
    p.add_argument("--embeddings", required=True, help="folder of per-image embedding files")
    p.add_argument("--one-image-per-file", action="store_true",
                   help="confirm that every file was trained on exactly one image (required)")
    p.add_argument("--noise-multiplier", type=float, default=None,
                   help="use this sigma and report its epsilon, instead of calibrating for --epsilon")
    p.add_argument("--center", default=None,
                   help="public embedding file the offsets are taken from (default: zero)")
    _add_release_options(p, "1.0", epsilon_required=False)
    p.set_defaults(func=_cmd_aggregate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``privdiff`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="privdiff: %(levelname)s: %(message)s", level=logging.INFO)
    if args.version:
        from privdiff import __version__

        print(__version__)
        return 0
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except PrivdiffError as exc:
        print(f"privdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privdiff: interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
