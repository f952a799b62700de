"""DP LoRA: train and release a DP-LoRA on the loaded checkpoint into the web UI's Lora folder."""

from __future__ import annotations

from dataclasses import dataclass

from privdiff.app.lora import train_lora
from privdiff.app.release_options import Release
from privdiff.errors import PrivdiffError
from privdiff.io.images import check_resolution, load_private_dataset
from privdiff.lora.training import LoRAConfig

from ..a1111_backend import training_session
from .common import Host, one_line_errors, training_model
from .forms import number, whole


@dataclass(frozen=True)
class LoRAForm:
    """The DP LoRA sub-tab's inputs."""

    images: str
    name: str
    epsilon: float = 4.0
    delta: float = 1e-5
    sample_rate: float = 1.0
    clip_norm: float = 1.0
    rank: int = 4
    alpha: float = 4.0
    targets: str = "attn"
    steps: int = 200
    learning_rate: float = 1e-3
    batch_size: int = 16
    prompt: str = ""
    resolution: int = 0
    ledger: str = ""
    budget_epsilon: float = 0.0
    overwrite: bool = False
    new_release: bool = False

    def release(self) -> Release:
        """The release options (a sample rate of 1 means batch_size/N)."""
        return Release(name=self.name.strip(), epsilon=self.epsilon, delta=self.delta, sample_rate=self.sample_rate,
                       clip_norm=self.clip_norm, bound="clip", prompt_template="{}", overwrite=self.overwrite,
                       ledger_path=self.ledger, budget_epsilon=self.budget_epsilon, new_release=self.new_release)

    def config(self) -> LoRAConfig:
        """The adapters and their training."""
        return LoRAConfig(rank=whole("rank", self.rank, 1, 1024), alpha=number("alpha", self.alpha),
                          targets=self.targets, steps=whole("steps", self.steps, 1, 10**6),
                          lr=number("learning rate", self.learning_rate),
                          batch_size=whole("batch size", self.batch_size, 1, 4096), prompt=self.prompt)


def train(host: Host, form: LoRAForm) -> tuple[str, str]:
    """Train and release a DP-LoRA into the Lora folder, then refresh the web UI's Lora list.

    Returns (privacy report, status line)."""
    out: list[str] = []
    with one_line_errors(out):
        release, config = form.release(), form.config()
        if release.name in host.lora_names() and not form.overwrite:
            raise PrivdiffError(f"a LoRA named {release.name!r} is already listed; pick another name or enable "
                                "overwrite")
        model = training_model(host)
        resolution = check_resolution(form.resolution) if form.resolution else None
        with training_session(model, resolution) as backend:
            dataset = load_private_dataset(form.images, backend.resolution)
            name, report = train_lora(backend, dataset, config, release, host.loras_dir(),
                                      progress=host.progress("privdiff: DP LoRA"),
                                      default_ledger=host.default_ledger())
        host.reload_loras()
        return report, f"wrote {name}: use it in a prompt with <lora:{name}:1>"
    return "", out[0]
