"""``privdiff he``: denoising with encrypted scheduler steps (HE-Diffusion), key holder and worker."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

from privdiff.cli import arguments
from privdiff.errors import PrivdiffError


def _threshold(text: str) -> float:
    from privdiff.he.selection import check_threshold

    try:
        return check_threshold(float(text))
    except (ValueError, PrivdiffError):
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None


def _address(any_port: bool) -> Callable[[str], str]:
    """argparse type: HOST:PORT that ``privdiff.he.protocol.parse_address`` reads."""

    def parse(text: str) -> str:
        from privdiff.he.protocol import parse_address

        try:
            parse_address(text, any_port=any_port)
            return text
        except PrivdiffError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _cmd_worker(args: argparse.Namespace) -> None:
    from privdiff.he.protocol import WorkerServer, parse_address

    host, port = parse_address(args.listen, any_port=True)
    try:
        server = WorkerServer((host, port), log=lambda line: print(line, file=sys.stderr, flush=True),
                              max_connections=args.max_connections, timeout=args.timeout,
                              idle_timeout=args.idle_timeout)
    except OSError as error:
        raise PrivdiffError(f"cannot listen on {args.listen} ({error.strerror or error})") from None
    arguments.print_json({"listening": f"{host}:{server.server_address[1]}"})
    sys.stdout.flush()
    with server, contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


def _cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from privdiff.he.ckks import KeyHolder
    from privdiff.he.protocol import RemoteWorker
    from privdiff.he.sampler import HEConfig, sample_images
    from privdiff.io.devices import check_device
    from privdiff.io.image_output import prompt_settings, save_images
    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.registry import load_model
    from privdiff.progress import tqdm_progress

    config = HEConfig(steps=args.steps, cfg=args.cfg, sampler=args.sampler, threshold=args.threshold,
                      packing=args.packing, channels=args.channels, encrypt_offsets=args.encrypt_offsets)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise PrivdiffError(f"--out {out} is a file, not a folder")
    holder = KeyHolder()  # refuses unusable CKKS parameters before the model loads
    if args.worker:
        RemoteWorker(args.worker, holder.public_context()).close()  # reachable, and a privdiff worker
    device = check_device(args.device)
    backend = DiffusersBackend(load_model(args.model, device=device, dtype=getattr(torch, args.dtype)))
    backend.freeze()
    height, width = args.height or backend.resolution, args.width or backend.resolution
    with tqdm_progress("encrypted sampling") as progress:
        images, report = sample_images(backend, args.prompt, args.negative_prompt, args.num_images, (height, width),
                                       config, args.seed, args.worker, progress=progress,
                                       vae_factor=backend.pipe.vae_scale_factor, holder=holder)
    settings = {**prompt_settings(args.prompt, args.negative_prompt, args.seed, args.save_prompt),
                "steps": config.steps, "cfg": config.cfg, "sampler": config.sampler, "threshold": config.threshold,
                "packing": config.packing, "channels": config.channels, "encrypt_offsets": config.encrypt_offsets}
    written = save_images(images, arguments.out_dir(args.out), settings)
    arguments.print_json({"images": [str(p) for p in written], **settings, "report": report.splitlines()})


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``he`` command group."""
    he = sub.add_parser("he", help="denoising with CKKS-encrypted scheduler steps (HE-Diffusion)").add_subparsers(
        dest="he_command", metavar="SUBCOMMAND", required=True)
    p = he.add_parser("worker", help="serve encrypted updates (public context only; never sees a secret key)")
    p.add_argument("--listen", type=_address(any_port=True), required=True,
                   help="HOST:PORT to listen on, e.g. 127.0.0.1:7000 (port 0: any)")
    p.add_argument("--max-connections", type=arguments.integer(1, 1024), default=8,
                   help="key holders served at once; more are refused (default 8)")
    p.add_argument("--timeout", type=arguments.real(3600), default=30.0,
                   help="seconds a message may stall before the connection is dropped (default 30)")
    p.add_argument("--idle-timeout", type=arguments.real(86400), default=600.0,
                   help="seconds a key holder may take between updates, e.g. for its model (default 600)")
    p.set_defaults(func=_cmd_worker)

    p = he.add_parser("sample", help="the key holder: sample with encrypted scheduler steps")
    p.add_argument("--model", type=arguments.model, required=True, help="as for ti-aggregate")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--out", required=True, help="output folder for the PNG images (created if missing)")
    p.add_argument("--worker", type=_address(any_port=False), default=None,
                   help="HOST:PORT of `privdiff he worker` (default: both roles here)")
    p.add_argument("--threshold", type=_threshold, default=0.01,
                   help="share of the distortion left in plaintext, in [0, 1) (default 0.01; 0 encrypts every "
                        "element that carries distortion)")
    p.add_argument("--steps", type=arguments.integer(1, 1000), default=50, help="scheduler steps (default 50)")
    p.add_argument("--sampler", choices=["ddim", "plms", "euler"], default="ddim", help="default ddim")
    p.add_argument("--cfg", type=arguments.real(100), default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=arguments.integer(0, arguments.MAX_SEED), default=None,
                   help="reproducible noise from this seed: a worker who knows it can rebuild the image (default: "
                        "secret noise from a 256-bit key, not recorded)")
    p.add_argument("--packing", choices=["sparse", "dense"], default="dense",
                   help="dense (default, safest): the whole latent, so positions reveal nothing; sparse: the selected "
                        "elements and their positions (HE-Diffusion; the worker rebuilds much of the image)")
    p.add_argument("--channels", choices=["reference", "separate"], default="reference",
                   help="HILL filtering across the channels as HE-Diffusion (reference) or per channel")
    p.add_argument("--encrypt-offsets", action=argparse.BooleanOptionalAction, default=True,
                   help="encrypt the updates' offsets too, so the worker never sees the model's predictions "
                        "(default; --no-encrypt-offsets sends them in plaintext, as HE-Diffusion)")
    p.add_argument("--save-prompt", action="store_true",
                   help="store the prompt, negative prompt and seed in the PNGs (default: left out, as from the "
                        "worker; the PNGs then hold the release settings only)")
    arguments.add_sampling_options(p)
    p.set_defaults(func=_cmd_sample)
