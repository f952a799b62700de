"""``privdiff audit``: an empirical lower bound on a release's ε from one run with canaries (not a release)."""

from __future__ import annotations

import argparse

from privdiff.cli import audit_aggregates, audit_dpsgd


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``audit`` command group: one subcommand per kind of release, with that release's options."""
    group = sub.add_parser(
        "audit", help="empirical lower bound on a release's epsilon from one run with canaries (writes nothing)",
    ).add_subparsers(dest="audit_command", required=True, metavar="{...}")
    audit_aggregates.add_commands(group)
    audit_dpsgd.add_commands(group)
