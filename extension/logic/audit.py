"""Audit: one run of a release's mechanism with canaries, and an empirical lower bound on its epsilon
(privdiff.app.audit). Not a release: nothing is written and no ledger is charged."""

from __future__ import annotations

from dataclasses import dataclass

from privdiff.app.audit import audit_aggregate_files, audit_embedding, audit_spectral, audit_style_target
from privdiff.app.release_options import Release
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import check_resolution, load_private_dataset

from ..a1111_backend import training_session
from .common import Host, one_line_errors, training_model
from .forms import number, whole
from .spectral import MAX_STEPS, prior_path

KINDS = {"ti-aggregate": "dpagg", "dpsgd-ti": "dpsgd", "aggregate": "", "guidance-target": "",
         "wavelet-finetune": ""}
"""The releases audited, named as ``privdiff audit`` names them (textual inversion kinds: their method)."""

MAX_CANARIES = 100_000


@dataclass(frozen=True)
class AuditForm:
    """The Audit sub-tab's inputs: the kind, what that kind's release takes (others are ignored), canaries and
    confidence."""

    kind: str
    images: str = ""
    embeddings: str = ""
    one_image_per_file: bool = False
    center: str = ""
    image_encoder: str = ""
    prior: str = ""
    epsilon: float = 4.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    clip_norm: float = 1.0
    n_vectors: int = 1
    init_word: str = "style"
    steps: int = 200
    learning_rate: float = 5e-3
    batch_size: int = 4
    resolution: int = 0
    canaries: int = 64
    confidence: float = 0.95

    def release(self) -> Release:
        """The release options audited (no name, output or ledger: an audit writes and charges nothing)."""
        target = self.kind == "guidance-target"
        return Release(name="audit", prompt_template="{}", epsilon=self.epsilon, delta=self.delta,
                       sample_rate=self.sample_rate, clip_norm=1.0 if target else self.clip_norm,
                       bound="normalize" if target else "clip",
                       noise_multiplier=self.noise_multiplier if self.kind == "aggregate" else 0.0)


def audit(host: Host, form: AuditForm) -> tuple[str, str]:
    """Audit the release ``form.kind`` describes: (the bound's text and JSON, status line)."""
    out: list[str] = []
    with one_line_errors(out):
        if form.kind not in KINDS:
            raise PrivdiffError(f"unknown kind {form.kind!r}; choose one of {', '.join(KINDS)}")
        canaries = whole("canaries", form.canaries, 2, MAX_CANARIES)
        confidence = number("confidence", form.confidence)
        release = form.release()
        progress = host.progress(f"privdiff: audit {form.kind}")
        if KINDS[form.kind]:
            config = TIConfig(n_vectors=whole("vectors", form.n_vectors, 1, 16), init_word=form.init_word,
                              steps=whole("steps", form.steps, 1, MAX_STEPS),
                              lr=number("learning rate", form.learning_rate),
                              batch_size=whole("batch size", form.batch_size, 1, 256))
            model = training_model(host)
            resolution = check_resolution(form.resolution) if form.resolution else None
            with training_session(model, resolution) as backend:
                dataset = load_private_dataset(form.images, backend.resolution)
                text = audit_embedding(backend, dataset, KINDS[form.kind], config, release, canaries, confidence,
                                       progress)
        elif form.kind == "aggregate":
            text = audit_aggregate_files(form.embeddings, form.one_image_per_file, form.center, release, canaries,
                                         confidence)
        elif form.kind == "guidance-target":
            from privdiff.models.image_encoders import load_image_encoder

            encoder = load_image_encoder(form.image_encoder.strip())
            dataset = load_private_dataset(form.images, encoder.size)
            text = audit_style_target(encoder, dataset, release, canaries, confidence, progress)
        else:
            from privdiff.wavelet.training import TrainConfig

            config = TrainConfig(steps=whole("steps", form.steps, 1, MAX_STEPS),
                                 lr=number("learning rate", form.learning_rate))
            text = audit_spectral(prior_path(host.priors_dir(), form.prior), form.images, release, config, canaries,
                                  confidence, progress)
        return text, text.split("\n", 1)[0]
    return "", out[0]
