"""The ``privdiff`` command: a thin front over the library; JSON on stdout, one-line errors on stderr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator, Sequence

from privdiff.cli import aggregate, arguments, audit, guidance, he, lora, privacy, textual_inversion, tools, wavelet
from privdiff.errors import PrivdiffError, ReportedElsewhere


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used to render the CLI reference)."""
    parser = arguments.Parser(prog="privdiff", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    privacy.add_privacy_commands(sub)
    tools.add_commands(sub)
    textual_inversion.add_commands(sub)
    aggregate.add_commands(sub)
    guidance.add_commands(sub)
    wavelet.add_commands(sub)
    he.add_commands(sub)
    audit.add_commands(sub)
    lora.add_commands(sub)
    privacy.add_ledger_commands(sub)
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
    print(f"privdiff: error: {arguments.one_line(message) or 'failed'}", file=sys.stderr)
    return 2


def _ranks_requested() -> bool:
    """Whether torchrun (or srun, or a user) started this process as one rank of several (``WORLD_SIZE`` > 1)."""
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``privdiff`` console script: 0 on success; on bad input one line ``privdiff: error:
    ...`` on stderr and 2; 130 when interrupted."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed by arguments.Parser.error (2)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    logging.basicConfig(format="privdiff: %(levelname)s: %(message)s", level=logging.INFO)
    if args.version:
        from privdiff import __version__

        print(__version__)
        return 0
    if not hasattr(args, "func"):
        return _error("a command is required; see privdiff --help")
    if _ranks_requested() and not getattr(args, "across_ranks", False):
        if os.environ.get("RANK", "0").strip() != "0":
            return 2  # rank 0 says why, once
        return _error(f"privdiff {args.command} runs in one process: start it without torchrun (WORLD_SIZE="
                      f"{os.environ['WORLD_SIZE'][:20]!r}); see README, Scaling out, for the commands that scale out")
    try:
        with _without_torchvision_notices():
            args.func(args)
    except ReportedElsewhere:  # another rank failed, and rank 0 reports it in one line
        return 2
    except PrivdiffError as exc:
        return _error(exc)
    except OSError as exc:  # the system refused a read or write the checks could not foresee
        from privdiff.io.atomic import os_reason

        return _error(f"{exc.filename}: {os_reason(exc)}" if exc.filename else os_reason(exc))
    except KeyboardInterrupt:
        print("privdiff: interrupted; no output written", file=sys.stderr)
        if _ranks_requested():
            # An interrupt that surfaced inside torch.distributed's C++ leaves CPython's "unhandled Ctrl-C" mark,
            # and at exit it would kill itself with SIGINT: a rank that handled its interrupt ends with 130.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    return 0
