"""DP style guidance: release a DP style target (an aggregate of the private images' CLIP embeddings), and
universal-guidance sampling toward it with the loaded checkpoint (post-processing: no budget)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from privdiff.app.guidance import make_style_target
from privdiff.app.release_options import Release, target_path
from privdiff.io.images import load_private_dataset

from ..a1111_backend import training_session
from .common import Host, one_line_errors, training_model


@dataclass(frozen=True)
class TargetForm:
    """The DP style target inputs."""

    images: str
    name: str
    image_encoder: str
    epsilon: float = 1.0
    delta: float = 1e-5
    ledger: str = ""
    overwrite: bool = False


def make_target(host: Host, form: TargetForm) -> tuple[str, str]:
    """Release a DP style target into ``models/privdiff_targets``: (report, status line)."""
    from privdiff.models.image_encoders import load_image_encoder

    out: list[str] = []
    with one_line_errors(out):
        release = Release(name=form.name.strip(), epsilon=form.epsilon, delta=form.delta, sample_rate=1.0,
                          clip_norm=1.0, bound="clip", prompt_template="{}", overwrite=form.overwrite,
                          ledger_path=form.ledger)
        encoder = load_image_encoder(form.image_encoder.strip())
        dataset = load_private_dataset(form.images, encoder.size)
        text, name = make_style_target(encoder, dataset, release, host.targets_dir(),
                                       progress=host.progress("privdiff: DP style target"),
                                       default_ledger=host.default_ledger())
        return text, f"wrote style target {name} in {host.targets_dir()}"
    return "", out[0]


@dataclass(frozen=True)
class GuidedForm:
    """The guided sampling inputs."""

    target: str
    image_encoder: str
    prompt: str
    negative_prompt: str = ""
    num_images: int = 1
    width: int = 512
    height: int = 512
    steps: int = 30
    cfg: float = 7.0
    guidance_weight: float = 5.0
    recurrence: int = 1
    seed: int = 0


def guided_sample(host: Host, form: GuidedForm) -> tuple[list[Path], str]:
    """Universal-guidance sampling toward a style target with the loaded checkpoint; the images go to the
    txt2img outputs folder. Returns (image files, status line)."""
    from privdiff.guidance.sampler import GuidanceConfig, check_sample_memory, sample_images
    from privdiff.guidance.target import check_encoder, load_target
    from privdiff.io.image_output import save_images
    from privdiff.models.image_encoders import load_image_encoder

    out: list[str] = []
    with one_line_errors(out):
        config = GuidanceConfig(steps=int(form.steps), cfg=form.cfg, weight=form.guidance_weight,
                                recurrence=int(form.recurrence))
        check_sample_memory(int(form.num_images), int(form.height), int(form.width))
        target_file = target_path(host.targets_dir(), form.target)
        target = load_target(target_file)
        encoder = load_image_encoder(form.image_encoder.strip())
        check_encoder(target, encoder, str(target_file), form.image_encoder)
        model = training_model(host)
        with training_session(model) as backend:
            encoder.to(backend.device)
            images = sample_images(backend, form.prompt, form.negative_prompt, int(form.num_images),
                                   (int(form.height), int(form.width)), config, int(form.seed), encoder,
                                   target.vector, host.progress("privdiff: guided sampling"))
        settings = {"prompt": form.prompt, "negative_prompt": form.negative_prompt, "seed": int(form.seed),
                    "steps": config.steps, "cfg": config.cfg, "guidance_weight": config.weight,
                    "recurrence": config.recurrence, "target_release_id": target.report.release_id}
        written = save_images(images, host.outputs_dir(), settings)
        return written, (f"{len(written)} image(s) in {host.outputs_dir()}; target "
                         f"(epsilon={target.report.epsilon:.3g}, delta={target.report.delta:.2g}): sampling spends "
                         "no budget")
    return [], out[0]
