"""``privdiff audit``: an empirical lower bound on a release's ε from one run with canaries (not a release)."""

from __future__ import annotations

import argparse

from privdiff.cli import arguments, audit_aggregates, audit_dpsgd

CONFIDENCE = arguments.real(1.0, high_open=True)


def add_audit_options(p: argparse.ArgumentParser) -> None:
    """The options every audit adds to those of the release it audits."""
    p.add_argument("--canaries", type=arguments.integer(2, 100_000), required=True,
                   help="canaries M: each goes into the audited run with probability 1/2")
    p.add_argument("--confidence", type=CONFIDENCE, default=0.95,
                   help="confidence of the lower bound, in (0, 1) (default 0.95)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``audit`` command group: one subcommand per kind of release, with that release's options."""
    group = sub.add_parser(
        "audit", help="empirical lower bound on a release's epsilon from one run with canaries (writes nothing)",
    ).add_subparsers(dest="audit_command", required=True, metavar="{...}")
    audit_aggregates.add_commands(group, add_audit_options)
    audit_dpsgd.add_commands(group, add_audit_options)
