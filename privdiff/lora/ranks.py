"""DP-LoRA across torchrun ranks: rank 0 hands each rank its public slice of the private files; every rank trains
the same adapters on its examples of each step's batch, and rank 0 adds the noise once."""

from __future__ import annotations

from collections.abc import Callable

from privdiff.io.images import PrivateFiles
from privdiff.lora.release import LoRAResult
from privdiff.lora.training import LoRAConfig, latents_of, lora_settings, train_dp_lora
from privdiff.models.protocol import SDBackend
from privdiff.privacy.distributed import Share, World, shares
from privdiff.privacy.randomness import SecureRandom
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.dp_params import DPParams


def run_dp_lora_ranks(
    world: World,
    load_backend: Callable[[], SDBackend],
    *,
    private: PrivateFiles | None = None,
    resolution: int | None = None,
    params: DPParams | None = None,
    config: LoRAConfig | None = None,
    seed: int | None = None,
    report: PrivacyReport | None = None,
    progress: Progress | None = None,
) -> tuple[SDBackend, LoRAResult | None]:
    """DP-LoRA across the ranks of ``world`` (``train_dp_lora``). Rank 0 passes the files, parameters and report
    (None elsewhere) and draws every step's Poisson batch and noise; each rank gets its slice's bytes as charged and
    decodes it whole. The same adapters as ``run_dp_lora`` in one process with the same seed, to the rounding of
    the float64 sums. Returns this rank's backend (its UNet holds the adapters) and, on rank 0, the result."""
    plans, rng = None, None
    if world.leader:
        rng = SecureRandom(seed)
        settings = lora_settings(config, params, report, rng)
        plans = [Share(private.subset(rows), rows, [], settings.key, (settings, resolution, len(private)))
                 for rows in shares(len(private), world.size)]
    share: Share = world.scatter(plans)
    settings, resolution, n = share.settings
    state: dict[str, object] = {}

    def prepare() -> None:
        backend = load_backend()
        images = share.records.load(resolution or backend.resolution).images  # every file of the slice
        state["backend"] = backend
        state["latents"] = latents_of(backend, images, share.rows, settings.key)

    world.collect(prepare)
    backend = state["backend"]
    adapters = train_dp_lora(world, backend, state["latents"], share.rows, n, settings, rng,
                             progress if world.leader else None)
    return backend, LoRAResult(adapters, backend.family, report) if world.leader else None
