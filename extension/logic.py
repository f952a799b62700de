"""What the privdiff tab does, as plain functions over a :class:`Host`: inputs → library calls → outputs.

No gradio and no A1111 import here: ``extension/host.py`` implements the Host over A1111's ``modules``,
and CI tests these functions with a stand-in host. Every action returns text for the tab; bad input
(PrivdiffError) and Interrupt become one line, and nothing is written or charged.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, get_type_hints

import torch

from privdiff.app.embeddings import train_embedding
from privdiff.app.guidance import make_style_target
from privdiff.app.release_options import Release, read_report, target_path
from privdiff.app.spectral import finetune_spectral
from privdiff.embeddings.dpagg import EMBEDDING_SUFFIXES
from privdiff.embeddings.files import inspect_embedding, load_embedding, save_planned
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import check_resolution, load_private_dataset
from privdiff.io.untrusted import file_kind
from privdiff.privacy.ledger import BudgetLedger
from privdiff.release.output_plan import FORMATS, SUFFIXES, plan_output

from .a1111_backend import training_session

FORGE_MESSAGE = ("privdiff: running the loaded SD checkpoint on Forge is not supported yet (its model objects differ "
                 "from A1111's); the report, ledger, embedding tools and spectral priors work")


GUIDED_FOLDER = "privdiff-guided"
"""The outputs subfolder of guided and spectral samples."""
HE_FOLDER = "privdiff-he"
"""The outputs subfolder of encrypted-denoising samples."""


class Interrupted(PrivdiffError):
    """The user pressed Interrupt."""


class Host(Protocol):
    """What the tab needs from the web UI (A1111's implementation is ``extension.host.A1111Host``)."""

    forge: bool

    def sd_model(self) -> torch.nn.Module:
        """The loaded checkpoint; raises PrivdiffError when none is loaded."""
        ...

    def embeddings_dir(self) -> Path: ...

    def embedding_names(self) -> set[str]:
        """Names the web UI already resolves in prompts (loaded or skipped embeddings)."""
        ...

    def reload_embeddings(self) -> None: ...

    def default_ledger(self) -> Path: ...

    def targets_dir(self) -> Path: ...

    def outputs_dir(self, folder: str = GUIDED_FOLDER) -> Path:
        """Where generated samples go: ``folder`` in the web UI's outputs (created)."""
        ...

    def priors_dir(self) -> Path:
        """Where spectral priors live, public and DP (``<models>/privdiff_priors``, created)."""
        ...

    def checkpoints_dir(self) -> Path:
        """Private state of interrupted fine-tunes (``<data dir>/privdiff/checkpoints``, created; never next to
        outputs)."""
        ...

    def progress(self, label: str) -> Callable[[int, int], None]:
        """A progress callback for the web UI's bar; raises :class:`Interrupted` after Interrupt."""
        ...

    def refresh_button(self, component: Any, choices: Callable[[], list[str]], elem_id: str) -> Any:
        """The web UI's refresh button next to ``component`` (a dropdown), which sets its choices to ``choices()``
        when clicked."""
        ...


def state_progress(state: Any, label: str) -> Callable[[int, int], None]:
    """Progress through A1111's ``shared.state`` (one job; steps = the work's public total), checking
    Interrupt at every step: the exception unwinds the release, so nothing is written or charged."""
    state.job_count, state.job_no, state.textinfo = 1, 0, label

    def progress(done: int, total: int) -> None:
        if state.interrupted:
            raise Interrupted("interrupted: nothing was written and nothing was charged to the ledger")
        state.sampling_steps, state.sampling_step = total, done

    return progress


@contextmanager
def _one_line_errors(out: list[str]) -> Iterator[None]:
    """Turn bad input into one line appended to ``out``."""
    try:
        yield
    except PrivdiffError as exc:
        out.append(f"privdiff: {' '.join(str(exc).split())}")


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
        return Release(name=self.name.strip(), epsilon=self.epsilon, delta=self.delta, sample_rate=self.sample_rate,
                       clip_norm=self.clip_norm, bound="clip", prompt_template="a painting in the style of {}",
                       overwrite=self.overwrite, ledger_path=self.ledger, budget_epsilon=self.budget_epsilon,
                       new_release=self.new_release, prompt_syntax="{}")

    def config(self) -> TIConfig:
        return TIConfig(n_vectors=int(self.n_vectors), init_word=self.init_word, steps=int(self.steps),
                        lr=self.learning_rate, batch_size=int(self.batch_size))


def _typed(name: str, kind: type, value: object) -> object:
    """``value`` as a ``kind`` field of a JSON request (a whole float such as 3.0 counts as an int); else one line."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is float and number and math.isfinite(value):
        return float(value)
    if kind is int and number and math.isfinite(value) and value == int(value):
        return int(value)
    wanted = {bool: "true or false", str: "a string", float: "a finite number", int: "a whole number"}[kind]
    raise PrivdiffError(f"field {name!r} must be {wanted}, got {json.dumps(value)[:60]}")


def parse_form(form_type: type, body: object) -> Any:
    """A form dataclass from a JSON request body; a field that is unknown, missing or of the wrong type is one
    line naming it (PrivdiffError)."""
    if not isinstance(body, dict):
        raise PrivdiffError(f"the request body must be a JSON object of fields, got {type(body).__name__}")
    hints, known = get_type_hints(form_type), {f.name: f for f in fields(form_type)}
    for name in body:
        if name not in known:
            raise PrivdiffError(f"unknown field {name!r}; the fields are {', '.join(known)}")
    for name, spec in known.items():
        if name not in body and spec.default is MISSING:
            raise PrivdiffError(f"field {name!r} is required")
    return form_type(**{name: _typed(name, hints[name], value) for name, value in body.items()})


def _training_model(host: Host) -> torch.nn.Module:
    if host.forge:
        raise PrivdiffError(FORGE_MESSAGE.removeprefix("privdiff: "))
    return host.sd_model()


def train(host: Host, form: TrainForm) -> tuple[str, str]:
    """Train and release a DP embedding into the embeddings folder, then reload the embeddings.

    Returns (privacy report, status line)."""
    out: list[str] = []
    with _one_line_errors(out):
        release, config = form.release(), form.config()
        if release.name in host.embedding_names() and not form.overwrite:
            raise PrivdiffError(f"an embedding named {release.name!r} is already loaded; pick another name or "
                                "enable overwrite")
        model = _training_model(host)
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


def embedding_files(folder: Path) -> list[str]:
    """Embedding files under ``folder`` (A1111 also reads subfolders), as paths relative to it."""
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.suffix in EMBEDDING_SUFFIXES)


def _relative_name(folders: list[Path], choice: str) -> Path:
    """``choice`` as a relative name, refused in one line when it is empty, absolute, ``~`` or climbs with ``..``."""
    text = (choice or "").strip()
    if not text:
        raise PrivdiffError("pick an embedding file")
    name = Path(text)
    if name.is_absolute() or name.drive or ".." in name.parts or text.startswith("~"):
        raise PrivdiffError(f"file {text!r} must be a name inside {', '.join(str(f) for f in folders)}")
    return name


def confined_path(folders: list[Path], choice: str) -> Path:
    """The file named ``choice`` (a relative name) in the first of ``folders`` that has it, after links are
    resolved; an absolute name, ``..`` or a link out of its folder is one line (the web UI may be on a network)."""
    name, text = _relative_name(folders, choice), choice.strip()
    for folder in folders:
        root = folder.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root):
            raise PrivdiffError(f"file {text!r} leads out of {folder}")
        if path.exists():
            return path
    raise PrivdiffError(f"file {text!r} is in none of {', '.join(str(f) for f in folders)}")


def report(host: Host, choice: str) -> str:
    """The privacy report a file in the embeddings, style-target or priors folder carries (text and JSON)."""
    out: list[str] = []
    with _one_line_errors(out):
        folders = [host.embeddings_dir(), host.targets_dir(), host.priors_dir()]
        return read_report(confined_path(folders, choice))
    return out[0]


def ledger(host: Host, path: str) -> str:
    """A ledger's budget, releases and largest per-image spend (the settings' ledger when ``path`` is empty)."""
    out: list[str] = []
    with _one_line_errors(out):
        book = BudgetLedger(Path(path.strip()).expanduser() if path.strip() else host.default_ledger())
        if not book.path.is_file():
            raise PrivdiffError(f"ledger {book.path} does not exist yet: nothing was released with it")
        return f"ledger {book.path}\n" + json.dumps(book.summary(), indent=2)
    return out[0]


def inspect(host: Host, choice: str) -> str:
    """Format, tensors, model family and privacy report of an embedding file."""
    out: list[str] = []
    with _one_line_errors(out):
        return json.dumps(inspect_embedding(confined_path([host.embeddings_dir()], choice)), indent=2)
    return out[0]


def convert(host: Host, choice: str, fmt: str, output: str, overwrite: bool) -> str:
    """Convert an embedding file of the embeddings folder to ``fmt`` (one of ``FORMATS``), into that folder: the
    output is a name inside it (empty: the input's name with the format's extension); paths out are refused."""
    out: list[str] = []
    with _one_line_errors(out):
        folder = host.embeddings_dir()
        source = confined_path([folder], choice)
        if fmt not in FORMATS:
            raise PrivdiffError(f"unknown embedding format {fmt!r}; choose one of {', '.join(FORMATS)}")
        target = folder / _relative_name([folder], output) if output.strip() else source.with_suffix(
            SUFFIXES[fmt][0])
        if not target.parent.resolve().is_relative_to(folder.resolve()):
            raise PrivdiffError(f"output {output.strip()!r} leads out of {folder}")
        plan = plan_output(target, fmt, None, overwrite)
        written = save_planned(load_embedding(source), plan)
        host.reload_embeddings()
        return f"wrote {written} ({plan.fmt})"
    return out[0]


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
    with _one_line_errors(out):
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
    with _one_line_errors(out):
        config = GuidanceConfig(steps=int(form.steps), cfg=form.cfg, weight=form.guidance_weight,
                                recurrence=int(form.recurrence))
        check_sample_memory(int(form.num_images), int(form.height), int(form.width))
        target_file = target_path(host.targets_dir(), form.target)
        target = load_target(target_file)
        encoder = load_image_encoder(form.image_encoder.strip())
        check_encoder(target, encoder, str(target_file), form.image_encoder)
        model = _training_model(host)
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



# Spectral DP generation (privdiff/wavelet): a DP fine-tune of a public prior over coarse Haar-wavelet tokens, and
# samples from any prior, optionally upsampled by a public model (post-processing: no budget).

UPSAMPLING = ("none", "bicubic", "upscaler", "SD refine", "upscaler + SD refine")
"""The sample column's choices: what happens to the prior's coarse samples."""

MAX_STEPS = 100_000
MAX_IMAGES = 1024
MAX_SEED = 2**32 - 1
REFINE_BATCH = 4
"""Images per SD refine call (the model's full resolution, with classifier-free guidance: 2x the batch)."""

def _whole(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in low..high (a float like 3.0 from a number box is fine); else one line."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value != int(value):
        raise PrivdiffError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise PrivdiffError(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise PrivdiffError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def prior_files(folder: Path) -> list[str]:
    """Spectral prior files (``.safetensors``) under ``folder``, as paths relative to it."""
    if not folder.is_dir():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors") if p.is_file())


def _prior_path(folder: Path, choice: str) -> Path:
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
    with _one_line_errors(out):
        folder = host.priors_dir()
        public = _prior_path(folder, form.prior)
        config = TrainConfig(steps=_whole("steps", form.steps, 1, MAX_STEPS),
                             lr=_number("learning rate", form.learning_rate))
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
    with _one_line_errors(out):
        if form.upsampling not in UPSAMPLING:
            raise PrivdiffError(f"unknown upsampling {form.upsampling!r}; choose one of {', '.join(UPSAMPLING)}")
        prior = _prior_path(host.priors_dir(), form.prior)
        count = _whole("number of images", form.num_images, 1, MAX_IMAGES)
        seed = _whole("seed", form.seed, -1, MAX_SEED)
        seed = secrets.randbelow(MAX_SEED + 1) if seed < 0 else seed
        temperature = _number("temperature", form.temperature)
        scale = _whole("bicubic scale", form.scale, 2, 16) if form.upsampling == "bicubic" else 1
        refining = form.upsampling.endswith("SD refine")
        upscaler = None
        if form.upsampling.startswith("upscaler"):
            if not form.upscaler.strip():
                raise PrivdiffError("pick an upscaler model file (ESRGAN, SwinIR, ... as in models/ESRGAN)")
            upscaler = load_upscaler(Path(form.upscaler.strip()).expanduser())
        if refining:  # everything the SD pass needs is checked before any sampling
            strength = _number("strength", form.strength)
            if not 0 < strength <= 1:
                raise PrivdiffError(f"strength {strength} must be in (0, 1]")
            guidance = GuidanceConfig(steps=_whole("refine steps", form.refine_steps, 1, 1000),
                                      cfg=_number("CFG scale", form.cfg), weight=0.0, recurrence=1)
            size = check_resolution(_whole("refine size", form.refine_size, 0, 4096)) if form.refine_size else 0
            if size % 8:
                raise PrivdiffError(f"refine size {size} must be a multiple of 8")
            model = _training_model(host)
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


# Encrypted denoising (privdiff/he, HE-Diffusion): the loaded checkpoint's UNet runs here (the key holder); each
# scheduler step's update runs on CKKS ciphertexts for the selected latent elements, by a worker in this process or
# at HOST:PORT (`privdiff he worker`), which gets the public context only.

MAX_BATCH = 64
MAX_SIZE = 4096


@dataclass(frozen=True)
class EncryptedForm:
    """The encrypted denoising inputs (``worker``: HOST:PORT of ``privdiff he worker``; empty: both roles here;
    ``save_prompt``: store the prompt, negative prompt and seed in the PNGs)."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "ddim"
    steps: int = 50
    cfg: float = 7.5
    seed: int = -1
    width: int = 512
    height: int = 512
    num_images: int = 1
    threshold: float = 0.01
    packing: str = "dense"
    channels: str = "reference"
    encrypt_offsets: bool = True
    worker: str = ""
    save_prompt: bool = False


def encrypted_sample(host: Host, form: EncryptedForm) -> tuple[list[Path], str, str]:
    """Sample with the loaded checkpoint, every scheduler step's update on CKKS ciphertexts; the images go to the
    outputs folder's ``privdiff-he``. Returns (image files, report, status line); the report is empty on error."""
    from privdiff.he.protocol import parse_address
    from privdiff.he.sampler import HEConfig, sample_images
    from privdiff.io.image_output import prompt_settings, save_images

    out: list[str] = []
    with _one_line_errors(out):
        config = HEConfig(steps=_whole("steps", form.steps, 1, 1000), cfg=_number("CFG scale", form.cfg),
                          sampler=form.sampler, threshold=_number("threshold", form.threshold), packing=form.packing,
                          channels=form.channels, encrypt_offsets=bool(form.encrypt_offsets))
        size = (_whole("height", form.height, 8, MAX_SIZE), _whole("width", form.width, 8, MAX_SIZE))
        count = _whole("batch size", form.num_images, 1, MAX_BATCH)
        seed = _whole("seed", form.seed, -1, MAX_SEED)
        seed = None if seed < 0 else seed  # -1: secret noise from a 256-bit key, not recorded
        worker = (form.worker or "").strip() or None
        if worker is not None:
            parse_address(worker, what="worker address")
        model = _training_model(host)
        with training_session(model) as backend:
            images, report = sample_images(backend, form.prompt, form.negative_prompt, count, size, config, seed,
                                           worker, progress=host.progress("privdiff: encrypted denoising"))
        settings = {**prompt_settings(form.prompt, form.negative_prompt, seed, bool(form.save_prompt)),
                    "steps": config.steps, "cfg": config.cfg, "sampler": config.sampler,
                    "threshold": config.threshold, "packing": config.packing, "channels": config.channels,
                    "encrypt_offsets": config.encrypt_offsets, "worker": worker or "this process"}
        folder = host.outputs_dir(HE_FOLDER)
        written = save_images(images, folder, settings)
        mode = f"the worker at {worker}" if worker else "both roles in this process"
        noise = "secret noise" if seed is None else f"seed {seed}"
        return written, report, f"{len(written)} image(s) in {folder}, {noise}; encrypted steps with {mode}"
    return [], "", out[0]
