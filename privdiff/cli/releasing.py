"""What every release command does with its parsed options: ledger request, output plan, DP parameters, summary."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from privdiff.errors import PrivdiffError

if TYPE_CHECKING:
    from privdiff.privacy.distributed import World
    from privdiff.release.output_plan import OutputPlan


def ledger_request(args: argparse.Namespace, digests: list[str]) -> object:
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


def planned_output(args: argparse.Namespace) -> OutputPlan:
    """The checked plan for --out/--format/--token/--force: call it before anything else."""
    from privdiff.release.output_plan import plan_output

    return plan_output(args.out, args.format, args.token, args.force)


def summary(path: object, result: object, reservation: object) -> dict:
    """The JSON a release command prints: the output, its privacy report, the expected SNR and the ledger's spend."""
    out = {"output": str(path), **json.loads(result.report.to_json())}
    if result.expected_snr is not None:
        out["expected_snr_best_case"] = round(result.expected_snr, 3)
    if reservation is not None:
        spend = reservation.spend  # as composed when the release was reserved, this release included
        out["ledger"] = {"path": str(reservation.ledger.path), "release_id": reservation.release_id}
        if spend is not None:
            out["ledger"].update(largest_image_epsilon=spend.epsilon, delta=spend.delta,
                                     accountant=spend.accountant, relation=spend.relation)
    return out


def dp_params(args: argparse.Namespace, rate: float, noise_multiplier: float | None = None) -> object:
    """The DPParams of the parsed release options, at sample rate ``rate``."""
    from privdiff.release.dp_params import DPParams

    return DPParams(epsilon=args.epsilon, delta=args.delta, sample_rate=rate, clip_norm=args.clip_norm,
                    bound=args.bound, accountant=args.accountant, noise_multiplier=noise_multiplier,
                    public_size=args.public_size)


def _uses_cuda(device: str | None) -> bool:
    import torch

    return device.strip().startswith("cuda") if device else torch.cuda.is_available()


@contextlib.contextmanager
def joined_world(args: argparse.Namespace) -> Iterator[World]:
    """This process's rank among those torchrun started (a lone World without torchrun), left on the way out."""
    from privdiff.privacy.distributed import join_world

    world = join_world(uses_cuda=_uses_cuda(getattr(args, "device", None)))
    try:
        yield world
    finally:
        world.close()


def check_device_here(args: argparse.Namespace, world: World) -> str:
    """``--device`` checked on this machine (rank 0 checks it for every rank), as this rank uses it."""
    from privdiff.io.devices import check_device

    return world.device(check_device(args.device))


def load_backend(args: argparse.Namespace, world: World) -> object:
    """The frozen DiffusersBackend of ``--model`` on this rank's device, in ``--dtype``."""
    import torch

    from privdiff.models.diffusers_backend import DiffusersBackend
    from privdiff.models.registry import load_model

    backend = DiffusersBackend(load_model(args.model, device=check_device_here(args, world),
                                          dtype=getattr(torch, args.dtype)))
    backend.freeze()
    return backend


def with_world(report: object, world: World) -> object:
    """``report`` recording how many ranks trained the release."""
    return dataclasses.replace(report, world_size=world.size)
