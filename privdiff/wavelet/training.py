"""Public pre-training and DP-SGD fine-tuning of the spectral prior, with checkpoints to resume from.

Pre-training sees public images only (a seeded generator is fine). Fine-tuning is DP-SGD through opacus:
Poisson sampling with rate q and privdiff's float64 clipping and CSPRNG noise
(``privdiff.privacy.dpsgd.PrivdiffDPOptimizer``), σ calibrated by the project's accountant for (ε, δ) over
the planned steps; one image is one example, and N is public by DP-SGD's convention (add-remove). Per-sample
gradients run in microbatches of a fixed public size padded with a public dummy (``dpsgd.sample_gradients``), so
an example's gradient does not depend on which other examples the Poisson batch holds.

A fine-tune writes a checkpoint (weights, optimizer state, steps done, the release's report) every
``checkpoint_every`` steps to a private folder. Resuming continues the same release: same report, same σ,
the remaining steps only, so the accountant counts each step once; the CSPRNG is freshly keyed (its key is
never written to disk).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from opacus.grad_sample import GradSampleModuleExpandedWeights
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from privdiff.errors import PrivdiffError
from privdiff.io.atomic import PRIVATE, atomic_write, os_reason
from privdiff.io.batching import padded
from privdiff.privacy.distributed import World
from privdiff.privacy.dpsgd import PrivdiffDPOptimizer, microbatch_size, sample_gradients
from privdiff.privacy.mechanism import poisson_sample
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams, plan_release
from privdiff.wavelet.prior import SpectralPrior

MECHANISM = "DP-SGD fine-tuning of a spectral (Haar-wavelet token) prior (opacus)"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by pre-training and fine-tuning."""

    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4

    def __post_init__(self) -> None:
        lr_ok = isinstance(self.lr, int | float) and 0 < self.lr < math.inf
        for name, value, ok in (("steps", self.steps, _whole(self.steps)),
                                ("batch size", self.batch_size, _whole(self.batch_size)),
                                ("learning rate", self.lr, lr_ok)):
            if not ok:
                raise PrivdiffError(f"invalid {name} {value!r}")


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def pretrain(prior: SpectralPrior, tokens: torch.Tensor, config: TrainConfig, seed: int = 0,
             progress: Progress | None = None, checkpoint: Path | None = None,
             checkpoint_every: int = 100) -> list[float]:
    """Maximum-likelihood training on **public** token sequences [N, L]; returns the loss per step.

    With ``checkpoint``, the state (weights, optimizer, batch generator, losses) is saved every
    ``checkpoint_every`` steps, and a run that finds the file continues from it (same result as uninterrupted).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=config.lr, weight_decay=0.01)
    device = next(prior.parameters()).device
    losses: list[float] = []
    if checkpoint is not None and checkpoint.is_file():
        try:
            state = torch.load(checkpoint, map_location=device, weights_only=True)
            prior.load_state_dict(state["prior"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            losses = list(state["losses"])
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise PrivdiffError(f"cannot resume pre-training from {checkpoint}: {' '.join(str(exc).split())[:200]}; "
                                "remove it to start again") from exc
    prior.train()
    for step in range(len(losses), config.steps):
        batch = tokens[torch.randint(len(tokens), (config.batch_size,), generator=generator)].to(device)
        loss = prior.loss(batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < config.steps:
            state = {"prior": prior.state_dict(), "optimizer": optimizer.state_dict(),
                     "generator": generator.get_state(), "losses": losses}
            _write_checkpoint(checkpoint, lambda tmp, state=state: torch.save(state, tmp))
        if progress is not None:
            progress(step + 1, config.steps)
    prior.eval()
    return losses


def _write_checkpoint(path: Path, write: Callable[[Path], None]) -> None:
    """Write a private (0600) checkpoint atomically; a failure is one line naming it (not its temporary)."""
    try:
        atomic_write(path, write, force=True, mode=PRIVATE)
    except (OSError, SafetensorError) as exc:
        raise PrivdiffError(f"cannot write checkpoint {path}: {os_reason(exc)}") from None


def plan_finetune(params: DPParams, dataset_size: int, config: TrainConfig, *, seed: int | None = None,
                  dataset_label: str | None = None) -> PrivacyReport:
    """The fine-tune's report before any private data is read: σ for (ε, δ) over ``config.steps`` steps."""
    if params.bound == "normalize":
        raise PrivdiffError("bound 'normalize' is not available for DP-SGD: per-sample gradients are clipped")
    return plan_release(MECHANISM, params, dataset_size, config.steps,
                        center="none: per-sample gradients are clipped (training starts from the public prior)",
                        dataset_label=dataset_label, private=seed is None, n_public_by_convention=True)


@dataclass(frozen=True)
class Checkpoint:
    """Where a fine-tune keeps its state; the file is private-derived: keep it away from outputs."""

    path: Path
    every: int = 50

    def save(self, prior: SpectralPrior, optimizer: torch.optim.Optimizer, done: int, report: PrivacyReport) -> None:
        state = {f"prior.{k}": v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}
        moments = optimizer.original_optimizer.state
        for i, p in enumerate(prior.parameters()):
            for name, value in moments.get(p, {}).items():
                state[f"adam.{i}.{name}"] = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous()
        metadata = {**report.to_metadata(), "privdiff_steps_done": str(done)}
        _write_checkpoint(self.path, lambda tmp: save_file(state, str(tmp), metadata=metadata))

    def load(self, prior: SpectralPrior, optimizer: torch.optim.Optimizer) -> tuple[int, PrivacyReport]:
        """Restore weights and optimizer moments; (steps done, the release's report)."""
        try:
            with safe_open(str(self.path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in list(f.keys())}
            report = PrivacyReport.from_metadata(metadata)
            done = int(metadata["privdiff_steps_done"])
        except (OSError, SafetensorError, ValueError, KeyError) as exc:
            raise PrivdiffError(f"cannot resume from {self.path}: {' '.join(str(exc).split())[:200]}") from exc
        if report is None:
            raise PrivdiffError(f"{self.path} is not a fine-tuning checkpoint (no privacy report)")
        prior.load_state_dict({k.removeprefix("prior."): v for k, v in state.items() if k.startswith("prior.")})
        for i, p in enumerate(prior.parameters()):
            if f"adam.{i}.step" in state:
                optimizer.original_optimizer.state[p] = {
                    "step": state[f"adam.{i}.step"].reshape(()),
                    "exp_avg": state[f"adam.{i}.exp_avg"].view_as(p).to(p.device),
                    "exp_avg_sq": state[f"adam.{i}.exp_avg_sq"].view_as(p).to(p.device),
                }
        return done, report


def carries_checkpoint(checkpoint: Checkpoint | None, release_id: str) -> bool:
    """Whether ``checkpoint`` holds state of the release ``release_id`` (then an interrupted run's charge stays)."""
    if checkpoint is None or not checkpoint.path.is_file():
        return False
    try:
        with safe_open(str(checkpoint.path), framework="pt") as f:
            report = PrivacyReport.from_metadata(f.metadata() or {})
    except (OSError, SafetensorError, ValueError):
        return False
    return report is not None and report.release_id == release_id


def checkpoint_report(checkpoint: Checkpoint) -> PrivacyReport:
    """The report of the release a checkpoint belongs to (to resume it under the same report)."""
    try:
        with safe_open(str(checkpoint.path), framework="pt") as f:
            report = PrivacyReport.from_metadata(f.metadata() or {})
    except (OSError, SafetensorError, ValueError) as exc:
        raise PrivdiffError(f"cannot resume from {checkpoint.path}: {' '.join(str(exc).split())[:200]}") from exc
    if report is None:
        raise PrivdiffError(f"{checkpoint.path} is not a fine-tuning checkpoint (no privacy report)")
    return report


def per_sample_gradients(module: GradSampleModuleExpandedWeights, tokens: torch.Tensor, size: int) -> None:
    """Set each prior parameter's ``grad_sample`` to the per-example loss gradients of ``tokens`` [B, L].

    ``module`` wraps the prior (loss reduction "sum"); the examples run ``size`` at a time, the last microbatch
    padded with the public dummy (all-zero codes), whose rows are dropped.
    """
    def backward(start: int, stop: int) -> None:
        module(padded(tokens[start:stop], size)).sum().backward()

    sample_gradients(list(module._module.parameters()), len(tokens), size, backward)


def finetune(
    prior: SpectralPrior,
    tokens: torch.Tensor,
    params: DPParams,
    config: TrainConfig,
    report: PrivacyReport,
    *,
    seed: int | None = None,
    checkpoint: Checkpoint | None = None,
    progress: Progress | None = None,
    world: World | None = None,
    rows: range | None = None,
) -> SpectralPrior:
    """DP-SGD on the private token sequences [N, L] under ``report`` (from :func:`plan_finetune`).

    With a ``checkpoint`` whose file holds this release, training resumes after the steps it records. Across the
    ranks of ``world``, ``tokens`` are this rank's records ``rows`` of the release's N: rank 0 (which alone keeps
    the checkpoint) sends every rank its starting state, draws each step's Poisson batch over all N and adds the
    noise once (``PrivdiffDPOptimizer.step_across``); each rank computes its examples' clipped gradients.
    """
    world = world or World()
    rows = range(len(tokens)) if rows is None else rows
    n = report.public_size
    if len(tokens) != len(rows) or (world.size == 1 and len(tokens) != n):
        raise PrivdiffError(f"{len(tokens)} private images, but the release was planned for {n}")
    device = next(prior.parameters()).device
    # torch's ExpandedWeights: per-sample gradients computed in place of the batch gradient, not beside it
    module = GradSampleModuleExpandedWeights(prior, loss_reduction="sum")
    expected = max(1, round(report.sample_rate * n))
    optimizer = PrivdiffDPOptimizer(
        torch.optim.Adam(module.parameters(), lr=config.lr), rng=SecureRandom(seed) if world.leader else None,
        noise_multiplier=report.noise_multiplier, max_grad_norm=params.clip_norm, expected_batch_size=expected)
    size = microbatch_size(expected)
    done = 0
    if world.leader and checkpoint is not None and carries_checkpoint(checkpoint, report.release_id):
        done, saved = checkpoint.load(prior, optimizer)
        if saved.release_id != report.release_id:
            raise PrivdiffError(f"{checkpoint.path} belongs to release {saved.release_id}, not {report.release_id}")
    if world.size > 1:
        done = _same_start(world, prior, optimizer, done)
    prior.train()
    try:
        for step in range(done, report.steps):
            optimizer.zero_grad(set_to_none=True)
            batch = world.broadcast(poisson_sample(n, report.sample_rate, optimizer.rng).tolist() if world.leader
                                    else None)
            mine = [i - rows.start for i in batch if i in rows]
            optimizer.step_across(world, lambda mine=mine: per_sample_gradients(module, tokens[mine].to(device), size))
            if world.leader and checkpoint is not None and (
                    (step + 1) % checkpoint.every == 0 or step + 1 == report.steps):
                checkpoint.save(prior, optimizer, step + 1, report)
            if progress is not None:
                progress(step + 1, report.steps)
    finally:
        optimizer.close()
    world.finishing()
    module._close()  # removes the per-sample gradients from the prior
    prior.eval()
    return prior


def _same_start(world: World, prior: SpectralPrior, optimizer: PrivdiffDPOptimizer, done: int) -> int:
    """Every rank starts from rank 0's weights, Adam state and step (a resumed checkpoint's, or the public prior's)."""
    state = world.broadcast((done, prior.state_dict(), optimizer.original_optimizer.state_dict())
                            if world.leader else None)
    if not world.leader:
        prior.load_state_dict(state[1])
        optimizer.original_optimizer.load_state_dict(state[2])
    return state[0]
