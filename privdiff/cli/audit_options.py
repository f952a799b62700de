"""What every ``privdiff audit`` subcommand adds to its release's options, and how it answers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from privdiff.cli import arguments

CONFIDENCE = arguments.real(1.0, high_open=True)
RELEASE_ONLY = ("out", "format", "token", "force", "ledger", "budget_epsilon", "budget_delta", "change_budget",
                "force_budget", "checkpoint_dir", "checkpoint_every")
"""Options of the release commands that write a file or charge a ledger: an audit does neither."""


def add_audit_parser(group: argparse._SubParsersAction, name: str, help_text: str,
                     add_release_arguments: Callable[[argparse.ArgumentParser], None],
                     func: Callable[[argparse.Namespace], None], ignored: tuple[str, ...] = ()) -> None:
    """The subcommand ``name``: its release's options (output options made optional), --canaries, --confidence.
    ``ignored``: more of the release's options the audit accepts and ignores."""
    p = group.add_parser(name, help=help_text)
    add_release_arguments(p)
    for action in p._actions:
        if action.dest in RELEASE_ONLY:
            action.required = False
    p.add_argument("--canaries", type=arguments.integer(2, 100_000), required=True,
                   help="canaries M: each goes into the audited run with probability 1/2")
    p.add_argument("--confidence", type=CONFIDENCE, default=0.95,
                   help="confidence of the lower bound, in (0, 1) (default 0.95)")
    names = tuple(a.dest for a in p._actions if a.dest in RELEASE_ONLY + ignored)
    p.set_defaults(func=func, ignored={dest: p.get_default(dest) for dest in names})


def print_result(result: object, args: argparse.Namespace) -> None:
    """The result's JSON on stdout, then one stderr line naming the ignored options given (after the run, so that a
    refusal stays one line)."""
    sys.stdout.write(result.to_json() + "\n")
    sys.stdout.flush()
    given = [f"--{dest.replace('_', '-')}" for dest, default in args.ignored.items() if getattr(args, dest) != default]
    if given:
        print(f"privdiff: note: {', '.join(given)} ignored: an audit is not a release (it writes no file and charges "
              "no ledger)", file=sys.stderr)
