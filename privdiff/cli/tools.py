"""``privdiff embedding``: inspect and convert embedding files."""

from __future__ import annotations

import argparse

from privdiff.cli import arguments


def _cmd_embedding_inspect(args: argparse.Namespace) -> None:
    from privdiff.embeddings.files import inspect_embedding

    arguments.print_json(inspect_embedding(args.file))


def _cmd_embedding_convert(args: argparse.Namespace) -> None:
    from privdiff.embeddings.files import load_embedding, save_planned
    from privdiff.release.output_plan import plan_output

    plan = plan_output(args.output, args.format, args.token, args.force)  # before the input is read
    out = save_planned(load_embedding(args.input), plan)
    arguments.print_json({"written": str(out), "format": plan.fmt})


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``embedding`` command group."""
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
