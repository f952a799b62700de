"""``privdiff privacy`` (ask the accountant) and ``privdiff ledger`` (read or repair a budget ledger)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from privdiff.cli import arguments
from privdiff.errors import PrivdiffError

if TYPE_CHECKING:
    from privdiff.privacy.ledger import BudgetLedger


def _cmd_privacy_epsilon(args: argparse.Namespace) -> None:
    from privdiff.privacy.accountants import epsilon_for

    name, eps = epsilon_for(
        args.noise_multiplier, args.sample_rate, args.steps, args.delta, accountant=args.accountant
    )
    arguments.print_json({"epsilon": eps, "delta": args.delta, "accountant": name})


def _cmd_privacy_sigma(args: argparse.Namespace) -> None:
    from privdiff.privacy.accountants import calibrate_noise_multiplier

    name, sigma = calibrate_noise_multiplier(
        args.epsilon, args.delta, args.sample_rate, args.steps, accountant=args.accountant
    )
    arguments.print_json(
        {
            "noise_multiplier": sigma,
            "epsilon": args.epsilon,
            "delta": args.delta,
            "sample_rate": args.sample_rate,
            "steps": args.steps,
            "accountant": name,
        }
    )


def _existing_ledger(path: str) -> BudgetLedger:
    """The BudgetLedger at ``path``, which must be a regular file (a FIFO or folder is refused unopened)."""
    from pathlib import Path

    from privdiff.io.untrusted import regular_file
    from privdiff.privacy.ledger import BudgetLedger

    return BudgetLedger(regular_file(Path(path).expanduser(), "ledger"))


def _cmd_ledger_show(args: argparse.Namespace) -> None:
    ledger = _existing_ledger(args.ledger)
    ledger.accountant = args.accountant
    arguments.print_json(ledger.summary())


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
    arguments.print_json({"cleared": args.release_id, "ledger": str(ledger.path)})


def add_privacy_commands(sub: argparse._SubParsersAction) -> None:
    """The ``privacy`` command group."""
    privacy = sub.add_parser("privacy", help="ask the privacy accountant").add_subparsers(
        dest="privacy_command", metavar="SUBCOMMAND", required=True
    )
    p = privacy.add_parser("epsilon", help="epsilon spent by the subsampled Gaussian mechanism")
    p.add_argument("--noise-multiplier", type=arguments.POSITIVE, required=True, help="sigma (noise std / clip norm)")
    p.add_argument("--sample-rate", type=arguments.RATE, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=arguments.integer(1, arguments.MAX_COMPOSITIONS), required=True,
                   help="number of compositions T")
    p.add_argument("--delta", type=arguments.UNIT_OPEN, required=True)
    arguments.add_accountant(p)
    p.set_defaults(func=_cmd_privacy_epsilon)

    p = privacy.add_parser("sigma", help="noise multiplier that reaches a target (epsilon, delta)")
    p.add_argument("--epsilon", type=arguments.POSITIVE, required=True)
    p.add_argument("--delta", type=arguments.UNIT_OPEN, required=True)
    p.add_argument("--sample-rate", type=arguments.RATE, required=True, help="Poisson sampling rate q")
    p.add_argument("--steps", type=arguments.integer(1, arguments.MAX_COMPOSITIONS), required=True,
                   help="number of compositions T")
    arguments.add_accountant(p)
    p.set_defaults(func=_cmd_privacy_sigma)


def add_ledger_commands(sub: argparse._SubParsersAction) -> None:
    """The ``ledger`` command group."""
    ledger = sub.add_parser("ledger", help="read or repair a budget ledger").add_subparsers(
        dest="ledger_command", metavar="SUBCOMMAND", required=True
    )
    p = ledger.add_parser("show", help="budget, releases (reserved or committed) and the largest image spend")
    p.add_argument("--ledger", required=True, help="budget ledger JSON file")
    arguments.add_accountant(p)
    p.set_defaults(func=_cmd_ledger_show)
    p = ledger.add_parser("clear", help="remove the reservation a killed run left (only if it released nothing)")
    p.add_argument("--ledger", required=True, help="budget ledger JSON file")
    p.add_argument("release_id", help="the reserved release's id (see ledger show)")
    p.set_defaults(func=_cmd_ledger_clear)
