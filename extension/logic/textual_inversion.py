"""DP Textual Inversion: train and release a DP embedding on the loaded checkpoint into the embeddings folder."""

from __future__ import annotations

from dataclasses import dataclass

from privdiff.app.embeddings import train_embedding
from privdiff.app.release_options import Release
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import check_resolution, load_private_dataset

from ..a1111_backend import training_session
from .common import Host, one_line_errors, training_model


@dataclass(frozen=True)
class TrainForm:
    """The DP Textual Inversion sub-tab's inputs."""

    images: str
    name: str
    method: str = "dpagg"
    epsilon: float = 4.0
    delta: float = 1e-5
    sample_rate: float = 1.0
    clip_norm: float = 1.0
    n_vectors: int = 1
    init_word: str = "style"
    steps: int = 200
    learning_rate: float = 5e-3
    batch_size: int = 4
    resolution: int = 0
    ledger: str = ""
    budget_epsilon: float = 0.0
    overwrite: bool = False
    new_release: bool = False

    def release(self) -> Release:
        """The release options (a painting-style prompt template, the embedding's name as the prompt word)."""
        return Release(name=self.name.strip(), epsilon=self.epsilon, delta=self.delta, sample_rate=self.sample_rate,
                       clip_norm=self.clip_norm, bound="clip", prompt_template="a painting in the style of {}",
                       overwrite=self.overwrite, ledger_path=self.ledger, budget_epsilon=self.budget_epsilon,
                       new_release=self.new_release, prompt_syntax="{}")

    def config(self) -> TIConfig:
        """The textual-inversion training settings."""
        return TIConfig(n_vectors=int(self.n_vectors), init_word=self.init_word, steps=int(self.steps),
                        lr=self.learning_rate, batch_size=int(self.batch_size))


def train(host: Host, form: TrainForm) -> tuple[str, str]:
    """Train and release a DP embedding into the embeddings folder, then reload the embeddings.

    Returns (privacy report, status line)."""
    out: list[str] = []
    with one_line_errors(out):
        release, config = form.release(), form.config()
        if release.name in host.embedding_names() and not form.overwrite:
            raise PrivdiffError(f"an embedding named {release.name!r} is already loaded; pick another name or "
                                "enable overwrite")
        model = training_model(host)
        resolution = check_resolution(form.resolution) if form.resolution else None
        with training_session(model, resolution) as backend:
            dataset = load_private_dataset(form.images, backend.resolution)
            prompt, report, name = train_embedding(
                backend, dataset, form.method, config, release, host.embeddings_dir(),
                progress=host.progress(f"privdiff: {form.method} textual inversion"),
                default_ledger=host.default_ledger())
        host.reload_embeddings()
        return report, f"wrote {name}: use it in a prompt, e.g. {prompt}"
    return "", out[0]
