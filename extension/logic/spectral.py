"""Spectral DP generation (privdiff/wavelet): a DP fine-tune of a public prior over coarse Haar-wavelet tokens, and
samples from any prior, optionally upsampled by a public model (post-processing: no budget)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from privdiff.app.release_options import Release
from privdiff.app.spectral import finetune_spectral
from privdiff.errors import PrivdiffError
from privdiff.io.images import check_resolution
from privdiff.io.untrusted import file_kind

from ..a1111_backend import training_session
from .common import Host, Interrupted, one_line_errors, training_model
from .forms import MAX_SEED, number, whole

UPSAMPLING = ("none", "bicubic", "upscaler", "SD refine", "upscaler + SD refine")
"""The sample column's choices: what happens to the prior's coarse samples."""

MAX_STEPS = 100_000
MAX_IMAGES = 1024
REFINE_BATCH = 4
"""Images per SD refine call (the model's full resolution, with classifier-free guidance: 2x the batch)."""


def prior_files(folder: Path) -> list[str]:
    """Spectral prior files (``.safetensors``) under ``folder``, as paths relative to it."""
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if p.is_file())


def prior_path(folder: Path, choice: str) -> Path:
    """An existing prior file: an absolute path, or a file (``.safetensors`` optional) in ``folder``."""
    text = (choice or "").strip()  # a gradio dropdown gives None when nothing is picked
    if not text:
        raise PrivdiffError(f"pick a prior file (in {folder}, or an absolute path)")
    path = Path(text).expanduser()
    if not path.is_absolute():
        if ".." in path.parts:
            raise PrivdiffError(f"prior {text!r} must be a file in {folder} or an absolute path")
        path = folder / path
    path = path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")
    kind = file_kind(path)  # from stat alone: a FIFO is refused, never opened
    if kind is not None:
        raise PrivdiffError(f"prior {path} does not exist (priors go in {folder})" if kind == "missing" else
                            f"prior {path} is {kind}, not a prior file")
    return path


def _folder_files(folder: Path) -> dict[str, tuple[int, int]]:
    """{name: (size, mtime)} of the files in ``folder``: what a run changed there."""
    try:
        return {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_file()}
    except OSError:
        return {}


class _FirstStep:
    """A progress callback that remembers the first step it saw (> 1: the run resumed from a checkpoint)."""

    def __init__(self, progress: Callable[[int, int], None]) -> None:
        self.progress, self.first = progress, 0

    def __call__(self, done: int, total: int) -> None:
        self.first = self.first or done
        self.progress(done, total)


@dataclass(frozen=True)
class SpectralForm:
    """The Spectral DP fine-tune inputs (``prior``: the public prior, a file in the priors folder or a path)."""

    images: str
    prior: str
    name: str
    epsilon: float = 4.0
    delta: float = 1e-5
    sample_rate: float = 0.25
    clip_norm: float = 1.0
    steps: int = 300
    learning_rate: float = 3e-4
    ledger: str = ""
    overwrite: bool = False


def spectral_finetune(host: Host, form: SpectralForm) -> tuple[str, str]:
    """Release a DP-SGD fine-tune of a public spectral prior on a private folder as
    ``<priors dir>/<name>.safetensors`` (it carries its report). Returns (privacy report, status line).

    The fine-tune checkpoints to the host's private checkpoints folder; after an Interrupt that came after a
    checkpoint, the release stays charged and the same request again resumes it (no second charge)."""
    from privdiff.wavelet.training import TrainConfig

    out: list[str] = []
    with one_line_errors(out):
        folder = host.priors_dir()
        public = prior_path(folder, form.prior)
        config = TrainConfig(steps=whole("steps", form.steps, 1, MAX_STEPS),
                             lr=number("learning rate", form.learning_rate))
        release = Release(name=form.name.strip(), epsilon=form.epsilon, delta=form.delta, sample_rate=form.sample_rate,
                          clip_norm=form.clip_norm, bound="clip", prompt_template="{}", overwrite=form.overwrite,
                          ledger_path=form.ledger)
        checkpoints = host.checkpoints_dir()
        before = _folder_files(checkpoints)
        progress = _FirstStep(host.progress("privdiff: spectral DP fine-tune"))
        try:
            text, path = finetune_spectral(public, form.images, release, config, folder, checkpoints,
                                           progress=progress, default_ledger=host.default_ledger())
        except Interrupted:
            if progress.first > 1 or _folder_files(checkpoints) != before:
                raise Interrupted("interrupted: no prior was written; the release stays charged and its progress is "
                                  "kept in a private checkpoint: run the same fine-tune again to resume it (no "
                                  "second charge)") from None
            raise
        return text, f"wrote DP prior {path.name} in {folder}: sample it with the Sample button"
    return "", out[0]


@dataclass(frozen=True)
class SpectralSampleForm:
    """The spectral sampling inputs: a prior (public or DP) and what upsamples its coarse samples."""

    prior: str
    num_images: int = 4
    seed: int = 0
    temperature: float = 1.0
    upsampling: str = "none"
    scale: int = 4
    upscaler: str = ""
    refine_prompt: str = ""
    negative_prompt: str = ""
    strength: float = 0.5
    refine_steps: int = 30
    cfg: float = 5.0
    refine_size: int = 0


def spectral_sample(host: Host, form: SpectralSampleForm) -> tuple[list[Path], str]:
    """Coarse samples from a spectral prior, upsampled as ``form.upsampling`` says (bicubic, a spandrel upscaler
    file, and/or an SD img2img pass with the loaded checkpoint), saved as PNGs in the outputs folder.
    Post-processing of the prior: no budget. Returns (image files, status line)."""
    import torch.nn.functional as F

    from privdiff.guidance.sampler import GuidanceConfig
    from privdiff.io.image_output import save_images
    from privdiff.wavelet.upsample import load_upscaler, refine, upscale
    from privdiff.wavelet.workflow import sample_prior

    out: list[str] = []
    with one_line_errors(out):
        if form.upsampling not in UPSAMPLING:
            raise PrivdiffError(f"unknown upsampling {form.upsampling!r}; choose one of {', '.join(UPSAMPLING)}")
        prior = prior_path(host.priors_dir(), form.prior)
        count = whole("number of images", form.num_images, 1, MAX_IMAGES)
        seed = whole("seed", form.seed, -1, MAX_SEED)
        seed = secrets.randbelow(MAX_SEED + 1) if seed < 0 else seed
        temperature = number("temperature", form.temperature)
        scale = whole("bicubic scale", form.scale, 2, 16) if form.upsampling == "bicubic" else 1
        refining = form.upsampling.endswith("SD refine")
        upscaler = None
        if form.upsampling.startswith("upscaler"):
            if not form.upscaler.strip():
                raise PrivdiffError("pick an upscaler model file (ESRGAN, SwinIR, ... as in models/ESRGAN)")
            upscaler = load_upscaler(Path(form.upscaler.strip()).expanduser())
        if refining:  # everything the SD pass needs is checked before any sampling
            strength = number("strength", form.strength)
            if not 0 < strength <= 1:
                raise PrivdiffError(f"strength {strength} must be in (0, 1]")
            guidance = GuidanceConfig(steps=whole("refine steps", form.refine_steps, 1, 1000),
                                      cfg=number("CFG scale", form.cfg), weight=0.0, recurrence=1)
            size = check_resolution(whole("refine size", form.refine_size, 0, 4096)) if form.refine_size else 0
            if size % 8:
                raise PrivdiffError(f"refine size {size} must be a multiple of 8")
            model = training_model(host)
        images, loaded = sample_prior(prior, count, seed=seed, temperature=temperature,
                                      progress=host.progress("privdiff: spectral sampling"))
        if upscaler is not None:
            images = upscale(images, upscaler)
        if scale > 1:
            images = F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
        settings: dict[str, object] = {"prior": prior.name, "seed": seed, "temperature": temperature,
                                       "prior_release_id": loaded.report.release_id if loaded.report else None,
                                       "upsampling": form.upsampling}
        if scale > 1:
            settings["scale"] = scale
        if upscaler is not None:
            settings["upscaler"] = Path(form.upscaler.strip()).name
        if refining:
            with training_session(model) as backend:
                size = size or backend.resolution
                overall, chunks = host.progress("privdiff: SD refine"), range(0, count, REFINE_BATCH)

                def chunk_progress(k: int) -> Callable[[int, int], None]:
                    return lambda done, total: overall(k * total + done, total * len(chunks))

                images = torch.cat([
                    refine(backend, images[i:i + REFINE_BATCH], form.refine_prompt, size=size, strength=strength,
                           steps=guidance.steps, cfg=guidance.cfg, negative_prompt=form.negative_prompt, seed=seed + i,
                           progress=chunk_progress(k))
                    for k, i in enumerate(chunks)])
            settings |= {"refine_prompt": form.refine_prompt, "negative_prompt": form.negative_prompt,
                         "strength": strength, "refine_steps": guidance.steps, "cfg": guidance.cfg,
                         "refine_size": size}
        folder = host.outputs_dir()
        written = save_images(images, folder, settings, prefix="spectral")
        report = loaded.report
        source = (f"DP prior (epsilon={report.epsilon:.3g}, delta={report.delta:.2g})" if report is not None
                  else "public prior (no privacy guarantee of its own)")
        return written, (f"{len(written)} image(s) in {folder}, seed {seed}, from a {source}: sampling and "
                         "upsampling spend no budget")
    return [], out[0]
