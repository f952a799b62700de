"""The ``privdiff`` command: a thin front over the library; JSON on stdout, one-line errors on stderr."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn

from privdiff.errors import PrivdiffError

if TYPE_CHECKING:
    from privdiff.privacy.ledger import BudgetLedger
    from privdiff.release.output_plan import OutputPlan

# Parse-time sanity ranges of the numeric options; the library checks the finer rules (e.g. delta < 1/N).
MAX_STEPS = 1_000_000
MAX_COMPOSITIONS = 1_000_000_000
MAX_LR = 10.0
MAX_CLIP_NORM = 1e4
MAX_BATCH_SIZE = 4096
MAX_VECTORS = 75  # CLIP's 77-token context minus BOS and EOS; check_config refuses more for the model's templates
MAX_COUNT = 1_000_000_000
MAX_SEED = 2**64 - 1


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors (subcommands' too) are one line, ``privdiff: error: ...``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"privdiff: error: {_one_line(message)}\n")


def _one_line(text: object) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _real(high: float = math.inf, high_open: bool = False, zero: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number > 0 (>= 0 with ``zero``) and below ``high`` (open or closed), else one line
    naming the value."""
    rule = f"a finite number {'>=' if zero else '>'} 0" + ("" if high == math.inf else
                                                             f" and {'<' if high_open else '<='} {high:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if zero else value > 0)
                and (value < high if high_open else value <= high)):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text.strip()}")
        return value

    return parse


def _integer(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in ``low..high``, else one line naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an integer from {low} to {high}, got {value}")
        return value

    return parse


def _resolution(text: str) -> int:
    """argparse type for --resolution: a whole number of pixels that privdiff.io.images.check_resolution accepts."""
    from privdiff.io.images import check_resolution

    try:
        return check_resolution(int(text))
    except ValueError as exc:  # PrivdiffError is a ValueError
        reason = exc if isinstance(exc, PrivdiffError) else f"must be a whole number of pixels, got {text!r}"
        raise argparse.ArgumentTypeError(str(reason)) from None


def _model(text: str) -> str:
    """argparse type for --model: 'small', 'tiny', 'tiny-sdxl', or an existing diffusers folder or checkpoint file."""
    from pathlib import Path

    path = Path(text)
    try:
        if text in ("small", "tiny", "tiny-sdxl") or (text.strip() and (path.is_dir() or (
                path.is_file() and path.suffix in (".safetensors", ".ckpt")))):
            return text
    except OSError as exc:  # e.g. a name too long for the filesystem
        raise argparse.ArgumentTypeError(f"model {text[:80]!r}: {exc.strerror or exc}") from None
    raise argparse.ArgumentTypeError(f"model {text!r} not found: expected 'small', 'tiny', 'tiny-sdxl', a diffusers "
                                     "folder or a .safetensors/.ckpt file")


def _word(text: str) -> str:
    """argparse type for --init-word: printable text with at least one non-space character."""
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"must be a printable word, got {text!r}")
    return text


def _device(text: str) -> str:
    """argparse type for --device: a torch device this machine has (privdiff.io.devices.check_device)."""
    from privdiff.io.devices import check_device

    try:
        return check_device(text)
    except PrivdiffError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


POSITIVE = _real()
UNIT_OPEN = _real(1.0, high_open=True)  # delta
RATE = _real(1.0)  # a Poisson sampling rate q in (0, 1]


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
    from privdiff.embeddings.files import load_embedding
    from privdiff.release.output_plan import plan_output, save_planned

    plan = plan_output(args.output, args.format, args.token, args.force)  # before the input is read
    out = save_planned(load_embedding(args.input), plan)
    _print_json({"written": str(out), "format": plan.fmt})


def _ledger_request(args: argparse.Namespace, digests: list[str]) -> object:
    """The LedgerRequest for ``--ledger`` charging the images of SHA-256 ``digests``, or None without a ledger."""
    if not args.ledger:
        if args.budget_epsilon is not None or args.budget_delta is not None or args.change_budget \
                or args.force_budget:
            raise PrivdiffError("--budget-epsilon, --budget-delta, --change-budget and --force-budget need --ledger")
        return None
    if args.budget_delta is not None and args.budget_epsilon is None:
        raise PrivdiffError("--budget-delta sets a budget together with --budget-epsilon; give both")
    from privdiff.release.artifact import open_ledger

    budget_delta = args.delta if args.budget_delta is None else args.budget_delta  # 0 is refused, not replaced
    return open_ledger(args.ledger, digests, budget_epsilon=args.budget_epsilon, budget_delta=budget_delta,
                       change_budget=args.change_budget, force=args.force_budget, accountant=args.accountant)


def _output(args: argparse.Namespace) -> OutputPlan:
    """The checked plan for --out/--format/--token/--force: call it before anything else."""
    from privdiff.release.output_plan import plan_output

    return plan_output(args.out, args.format, args.token, args.force)


def _summary(path: object, result: object, reservation: object) -> dict:
    summary = {"output": str(path), **json.loads(result.report.to_json())}
    if result.expected_snr is not None:
        summary["expected_snr_best_case"] = round(result.expected_snr, 3)
    if reservation is not None:
        spend = reservation.spend  # as composed when the release was reserved, this release included
        summary["ledger"] = {"path": str(reservation.ledger.path), "release_id": reservation.release_id}
        if spend is not None:
            summary["ledger"].update(largest_image_epsilon=spend.epsilon, delta=spend.delta,
                                     accountant=spend.accountant, relation=spend.relation)
    return summary


def _params(args: argparse.Namespace, rate: float, noise_multiplier: float | None = None) -> object:
    from privdiff.embeddings.dpagg import DPParams

    return DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate, clip_norm=args.clip_norm,
                    bound=args.bound, accountant=args.accountant, noise_multiplier=noise_multiplier,
                    public_size=args.public_size)


def _cmd_ti_aggregate(args: argparse.Namespace) -> None:
    import torch

    from privdiff.embeddings.dpagg import check_params
    from privdiff.embeddings.methods import METHODS, PLANS
    from privdiff.embeddings.textual_inversion import TIConfig, check_config
    from privdiff.io.devices import check_device
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.registry import load_model
    from privdiff.progress import tqdm_progress
    from privdiff.release.artifact import release_embedding

    output = _output(args)
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
    params = _params(args, rate)
    check_params(params, len(files), n_public_by_convention=args.method == "dpsgd")
    if args.method == "dpsgd" and args.bound != "clip":
        raise PrivdiffError(f"--bound {args.bound} is not available for --method dpsgd (it clips gradients)")
    device = check_device(args.device)
    ledger = _ledger_request(args, private.digests)
    report = PLANS[args.method](params, len(files), config, seed=args.reproducible_seed,
                                dataset_label=args.dataset_label)
    private.warn_skipped()  # every check passed: the warning comes before the work, never before an error

    def produce() -> object:  # runs once the release is charged
        backend = DiffusersBackend(load_model(args.model, device=device, dtype=getattr(torch, args.dtype)))
        backend.freeze()
        check_config(backend, config)  # --vectors against the model's text context, before any image is decoded
        resolution = backend.resolution if args.resolution is None else args.resolution  # checked by _resolution
        images = private.load(resolution).images
        with tqdm_progress(f"{args.method}: training") as progress:
            return METHODS[args.method](backend, images, params, config, seed=args.reproducible_seed,
                                        dataset_label=args.dataset_label, progress=progress, report=report)

    path, result, reservation = release_embedding(produce, report, output, ledger)
    _print_json(_summary(path, result, reservation))


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from privdiff.embeddings.dpagg import (
        aggregate_embedding_files,
        center_label,
        check_params,
        per_image_files,
        plan_files_release,
    )
    from privdiff.embeddings.files import load_embedding
    from privdiff.io.images import list_images
    from privdiff.privacy.ledger import image_digests
    from privdiff.release.artifact import release_embedding

    output = _output(args)
    if not args.one_image_per_file:
        raise PrivdiffError("the guarantee needs each file to come from exactly one image: confirm with "
                            "--one-image-per-file")
    files = per_image_files(args.embeddings)
    rate = 1.0 if args.sample_rate is None else args.sample_rate  # --sample-rate 0 is refused
    params = _params(args, rate, args.noise_multiplier)
    check_params(params, len(files))
    if args.ledger and not args.images:
        raise PrivdiffError("--ledger charges the images the embeddings were trained on: name their folder "
                            "with --images")
    sources = list_images(args.images) if args.images else []
    if sources and len(sources) != len(files):
        raise PrivdiffError(f"--images holds {len(sources)} images but --embeddings holds {len(files)} files; "
                            "they must correspond one to one")
    center = load_embedding(args.center) if args.center else None
    ledger = _ledger_request(args, image_digests(sources) if args.ledger else [])  # never decoded: one read
    report = plan_files_release(params, len(files), center_label(args.center), seed=args.reproducible_seed,
                                dataset_label=args.dataset_label)
    path, result, reservation = release_embedding(
        lambda: aggregate_embedding_files(files, params, center=center, seed=args.reproducible_seed, report=report),
        report, output, ledger,
    )
    _print_json(_summary(path, result, reservation))


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
    from privdiff.embeddings.dpagg import check_params, expected_snr
    from privdiff.guidance.target import make_target, plan_target, save_target, target_params
    from privdiff.io.devices import check_device
    from privdiff.io.images import check_memory, read_private_files
    from privdiff.models.image_encoders import load_image_encoder
    from privdiff.progress import tqdm_progress
    from privdiff.release.artifact import carries_release, release_artifact

    out = _target_out(args.out, args.force)
    private = read_private_files(args.images, warn=False)  # read once: the ledger charges the bytes decoded below
    files = private.files
    rate = 1.0 if args.sample_rate is None else args.sample_rate
    params = target_params(args.epsilon, args.delta, rate, accountant=args.accountant, public_size=args.public_size)
    check_params(params, len(files))
    device = check_device(args.device)
    ledger = _ledger_request(args, private.digests)
    encoder = load_image_encoder(args.image_encoder).to(device)  # public: loaded before the charge, to name it
    size = encoder.size
    check_memory(len(files), size)
    report = plan_target(params, len(files), encoder.identity, seed=args.reproducible_seed,
                         dataset_label=args.dataset_label)
    private.warn_skipped()  # every check passed: the warnings come before the work, never before an error
    expected_snr(report.public_size, rate, report.noise_multiplier, encoder.dim)

    def produce() -> object:
        images = private.load(size).images
        with tqdm_progress("target: embedding") as progress:
            return make_target(encoder, images, params, seed=args.reproducible_seed, report=report,
                               progress=progress)

    path, target, reservation = release_artifact(
        produce, report, out, lambda t: save_target(t, out, force=args.force), carries_release, ledger)
    summary = {"output": str(path), "image_encoder": target.encoder, **json.loads(target.report.to_json())}
    if reservation is not None:
        summary["ledger"] = {"path": str(reservation.ledger.path), "release_id": reservation.release_id}
    _print_json(summary)


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
    out_dir = _out_dir(args.out)  # checked, created only when the images are written
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
    _print_json({"images": [str(p) for p in written], **settings,
                 "target_epsilon": target.report.epsilon, "target_delta": target.report.delta})


def _out_dir(path: str) -> object:
    """An output folder for images, checked but not created (``save_images`` creates it with the first image)."""
    from privdiff.io.image_output import check_image_folder

    return check_image_folder(path, "--out")


def _cmd_guidance_inspect(args: argparse.Namespace) -> None:
    from privdiff.guidance.target import load_target

    target = load_target(args.file)
    _print_json({"file": args.file, "dim": int(target.vector.numel()), "image_encoder": target.encoder,
                 "privacy_report": json.loads(target.report.to_json())})


def _existing_ledger(path: str) -> BudgetLedger:
    """The BudgetLedger at ``path``, which must be a regular file (a FIFO or folder is refused unopened)."""
    from pathlib import Path

    from privdiff.io.untrusted import regular_file
    from privdiff.privacy.ledger import BudgetLedger

    return BudgetLedger(regular_file(Path(path).expanduser(), "ledger"))


def _cmd_ledger_show(args: argparse.Namespace) -> None:
    ledger = _existing_ledger(args.ledger)
    ledger.accountant = args.accountant
    _print_json(ledger.summary())


def _cmd_ledger_clear(args: argparse.Namespace) -> None:
    from pathlib import Path

    from privdiff.io.untrusted import file_kind
    from privdiff.release.artifact import carries_release

    ledger = _existing_ledger(args.ledger)
    entry = ledger.release(args.release_id)
    output = entry and entry["output"]
    kind = output and file_kind(output)
    if kind and kind != "missing":  # never opened: a FIFO would block, and what it holds cannot be told
        raise PrivdiffError(f"release {args.release_id}'s output {output} is {kind}: cannot tell whether it was "
                            "released, so its spend stays (move it away to clear the reservation)")
    if output and not kind and carries_release(Path(output), args.release_id):
        raise PrivdiffError(f"release {args.release_id} is in {output}: it was released, so its spend stays")
    ledger.clear(args.release_id)
    _print_json({"cleared": args.release_id, "ledger": str(ledger.path)})


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
    p.add_argument("--epsilon", type=POSITIVE, required=epsilon_required, help="target epsilon of this release")
    p.add_argument("--delta", type=UNIT_OPEN, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--sample-rate", type=RATE, default=None, help=f"Poisson sampling rate q (default {rate_default})")
    p.add_argument("--clip-norm", type=_real(MAX_CLIP_NORM), default=1.0,
                   help="bound C on each image's contribution (default 1.0)")
    p.add_argument("--bound", choices=["clip", "normalize"], default="clip",
                   help="clip: scale longer vectors down to C; normalize: scale all to exactly C")
    _add_accountant(p)
    p.add_argument("--format", choices=["safetensors", "a1111-pt", "diffusers"], default=None,
                   help="file format (default: from the extension; safetensors loads everywhere)")
    p.add_argument("--token", default=None,
                   help="token stored in an a1111-pt or diffusers file (default: output stem); safetensors files "
                        "store none (loaders use the file name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    _add_ledger_options(p)


def _add_ledger_options(p: argparse.ArgumentParser) -> None:
    """Ledger, public size and reproducible seed: every command that releases something takes them."""
    p.add_argument("--ledger", default=None, help="budget ledger JSON file (kept by you, never shipped)")
    p.add_argument("--budget-epsilon", type=POSITIVE, default=None, help="set the dataset's total epsilon budget")
    p.add_argument("--budget-delta", type=UNIT_OPEN, default=None, help="the budget's delta (default: --delta)")
    p.add_argument("--change-budget", action="store_true", help="replace a different budget stored in the ledger")
    p.add_argument("--force-budget", action="store_true", help="release even over the ledger's budget")
    p.add_argument("--public-size", type=_integer(1, MAX_COUNT), default=None,
                   help="a dataset size you declare public: the guarantee becomes add-remove (default: the real N "
                        "is used and the guarantee is replace-one)")
    p.add_argument("--reproducible-seed", type=_integer(0, MAX_SEED), default=None,
                   help="fixed seed for debugging: the release is marked NOT private")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the CLI reference)."""
    parser = _Parser(prog="privdiff", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    privacy = sub.add_parser("privacy", help="ask the privacy accountant").add_subparsers(
        dest="privacy_command", metavar="SUBCOMMAND", required=True
    )
    p = privacy.add_parser("epsilon", help="epsilon spent by the subsampled Gaussian mechanism")
    p.add_argument("--noise-multiplier", type=POSITIVE, required=True, help="sigma (noise std / clip norm)")
    p.add_argument("--sample-rate", type=RATE, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=_integer(1, MAX_COMPOSITIONS), required=True, help="number of compositions T")
    p.add_argument("--delta", type=UNIT_OPEN, required=True)
    _add_accountant(p)
    p.set_defaults(func=_cmd_privacy_epsilon)

    p = privacy.add_parser("sigma", help="noise multiplier that reaches a target (epsilon, delta)")
    p.add_argument("--epsilon", type=POSITIVE, required=True)
    p.add_argument("--delta", type=UNIT_OPEN, required=True)
    p.add_argument("--sample-rate", type=RATE, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=_integer(1, MAX_COMPOSITIONS), required=True, help="number of compositions T")
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
        "--format", choices=["safetensors", "a1111-pt", "diffusers"], default=None,
        help="output format (default: from the extension: .safetensors is safetensors, which ComfyUI, A1111 "
             "and diffusers all load; .pt is a1111-pt)",
    )
    p.add_argument("--token", default=None,
                   help="token stored in an a1111-pt or diffusers file (default: output stem); safetensors files "
                        "store none (loaders use the file name)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_cmd_embedding_convert)

    p = sub.add_parser("ti-aggregate", help="DP textual-inversion embedding from a folder of private images")
    p.add_argument("--model", type=_model, required=True,
                   help="local diffusers folder, local single-file SD1.x/SD2.x/SDXL checkpoint, 'small' (the shipped "
                   "reference model), 'tiny' or 'tiny-sdxl' (random weights)")
    p.add_argument("--images", required=True, help="folder of private images (png, jpg, webp, ...)")
    p.add_argument("--method", choices=["dpagg", "dpsgd"], default="dpagg",
                   help="dpagg: noisy aggregate of per-image embeddings (default); dpsgd: DP-SGD baseline")
    _add_release_options(p, "1.0 for dpagg, batch-size/N for dpsgd")
    p.add_argument("--vectors", type=_integer(1, MAX_VECTORS), default=1,
                   help="vectors per token (default 1; the model's text context allows fewer with long templates)")
    p.add_argument("--init-word", type=_word, default="style", help="public word the embedding starts from")
    p.add_argument("--templates", choices=["style", "object"], default="style", help="prompt templates")
    p.add_argument("--steps", type=_integer(1, MAX_STEPS), default=200,
                   help="optimiser steps per embedding (default 200)")
    p.add_argument("--lr", type=_real(MAX_LR), default=5e-3, help="Adam learning rate (default 5e-3)")
    p.add_argument("--batch-size", type=_integer(1, MAX_BATCH_SIZE), default=8,
                   help="images trained together (default 8)")
    p.add_argument("--resolution", type=_resolution, default=None,
                   help="training resolution in pixels, 8 to 4096 (default: the model's)")
    p.add_argument("--device", type=_device, default=None,
                   help="torch device: cpu, cuda, cuda:N, mps (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="model weights dtype (default float32)")
    p.set_defaults(func=_cmd_ti_aggregate)

    p = sub.add_parser("aggregate", help="DP aggregate of per-image embedding files trained elsewhere")
    p.add_argument("--embeddings", required=True, help="folder of per-image embedding files")
    p.add_argument("--one-image-per-file", action="store_true",
                   help="confirm that every file was trained on exactly one image (required)")
    p.add_argument("--noise-multiplier", type=POSITIVE, default=None,
                   help="use this sigma and report its epsilon, instead of calibrating for --epsilon")
    p.add_argument("--center", default=None,
                   help="public embedding file the offsets are taken from (default: zero)")
    p.add_argument("--images", default=None,
                   help="folder of the images the files were trained on, one per file (needed with --ledger)")
    _add_release_options(p, "1.0", epsilon_required=False)
    p.set_defaults(func=_cmd_aggregate)

    guidance = sub.add_parser("guidance", help="DP style targets and universal-guidance sampling").add_subparsers(
        dest="guidance_command", metavar="SUBCOMMAND", required=True
    )
    p = guidance.add_parser("target", help="DP style target: noisy mean of the images' unit CLIP embeddings")
    p.add_argument("--images", required=True, help="folder of private images")
    p.add_argument("--image-encoder", required=True,
                   help="transformers CLIP vision folder, ARCH:FILE for open_clip (e.g. RN50:RN50.pt), 'small' "
                   "(the small reference model's) or 'tiny'")
    p.add_argument("--out", required=True, help="target file (.safetensors)")
    p.add_argument("--epsilon", type=POSITIVE, required=True, help="target epsilon of this release")
    p.add_argument("--delta", type=UNIT_OPEN, required=True, help="target delta (must be below 1/N)")
    p.add_argument("--sample-rate", type=RATE, default=None, help="Poisson sampling rate q (default 1.0)")
    _add_accountant(p)
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.add_argument("--dataset-label", default=None, help="your label for the dataset, copied to the report")
    _add_ledger_options(p)
    p.add_argument("--device", type=_device, default=None, help="torch device for the image encoder")
    p.set_defaults(func=_cmd_guidance_target)
    p = guidance.add_parser("sample", help="sample with universal guidance toward a style target")
    p.add_argument("--model", type=_model, required=True, help="as for ti-aggregate")
    p.add_argument("--target", required=True, help="style target file from `privdiff guidance target`")
    p.add_argument("--image-encoder", required=True, help="the encoder the target was made with")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--out", required=True, help="output folder for the PNG images (created if missing)")
    p.add_argument("--guidance-weight", type=_real(1e6, zero=True), default=6.0,
                   help="w: strength of the pull toward the target (default 6; 0 turns guidance off)")
    p.add_argument("--recurrence", type=_integer(1, 100), default=6,
                   help="k: passes per step (self-recurrence; default 6; cost grows k-fold)")
    p.add_argument("--steps", type=_integer(1, 1000), default=50, help="DDIM steps (default 50)")
    p.add_argument("--cfg", type=_real(100), default=3.0, help="classifier-free guidance scale (default 3)")
    p.add_argument("--seed", type=_integer(0, MAX_SEED), default=0, help="sampling seed (default 0)")
    p.add_argument("--num-images", type=_integer(1, 64), default=1, help="images in the batch (default 1)")
    p.add_argument("--height", type=_resolution, default=None, help="pixels (default: the model's)")
    p.add_argument("--width", type=_resolution, default=None, help="pixels (default: the model's)")
    p.add_argument("--device", type=_device, default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="model weights dtype (default float32)")
    p.set_defaults(func=_cmd_guidance_sample)
    p = guidance.add_parser("inspect", help="encoder, width and privacy report of a style target file")
    p.add_argument("file")
    p.set_defaults(func=_cmd_guidance_inspect)

    from privdiff.cli_wavelet import add_commands as add_wavelet_commands

    add_wavelet_commands(sub)

    from privdiff.cli_he import add_commands as add_he_commands

    add_he_commands(sub)

    ledger = sub.add_parser("ledger", help="read or repair a budget ledger").add_subparsers(
        dest="ledger_command", metavar="SUBCOMMAND", required=True
    )
    p = ledger.add_parser("show", help="budget, releases (reserved or committed) and the largest image spend")
    p.add_argument("--ledger", required=True, help="budget ledger JSON file")
    _add_accountant(p)
    p.set_defaults(func=_cmd_ledger_show)
    p = ledger.add_parser("clear", help="remove the reservation a killed run left (only if it released nothing)")
    p.add_argument("--ledger", required=True, help="budget ledger JSON file")
    p.add_argument("release_id", help="the reserved release's id (see ledger show)")
    p.set_defaults(func=_cmd_ledger_clear)
    return parser


@contextlib.contextmanager
def _without_torchvision_notices() -> Iterator[None]:
    """Drop transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back ..." notices.

    Importing diffusers' pipelines prints them (transformers' lazy-import fallback, logger
    ``transformers.utils.import_utils``); privdiff uses no image processor, so they are noise before every
    message. Only those records of that logger are dropped, and only while a command runs.
    """
    logger = logging.getLogger("transformers.utils.import_utils")

    def notice(record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()

    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)


def _error(message: object) -> int:
    """Print the one-line error and return its exit code, 2."""
    print(f"privdiff: error: {_one_line(message) or 'failed'}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``privdiff`` console script: 0 on success; on bad input one line ``privdiff: error:
    ...`` on stderr and 2; 130 when interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed by _Parser.error (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    logging.basicConfig(format="privdiff: %(levelname)s: %(message)s", level=logging.INFO)
    if args.version:
        from privdiff import __version__

        print(__version__)
        return 0
    if not hasattr(args, "func"):
        return _error("a command is required; see privdiff --help")
    try:
        with _without_torchvision_notices():
            args.func(args)
    except PrivdiffError as exc:
        return _error(exc)
    except OSError as exc:  # the system refused a read or write the checks could not foresee
        from privdiff.io.atomic import os_reason

        return _error(f"{exc.filename}: {os_reason(exc)}" if exc.filename else os_reason(exc))
    except KeyboardInterrupt:
        print("privdiff: interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
