"""Encrypted denoising (privdiff/he, HE-Diffusion): the loaded checkpoint's UNet runs here (the key holder); each
scheduler step's update runs on CKKS ciphertexts for the selected latent elements, by a worker in this process or
at HOST:PORT (``privdiff he worker``), which gets the public context only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..a1111_backend import training_session
from .common import Host, one_line_errors, training_model
from .forms import MAX_SEED, number, whole

HE_FOLDER = "privdiff-he"
"""The outputs subfolder of encrypted-denoising samples."""
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
    with one_line_errors(out):
        config = HEConfig(steps=whole("steps", form.steps, 1, 1000), cfg=number("CFG scale", form.cfg),
                          sampler=form.sampler, threshold=number("threshold", form.threshold), packing=form.packing,
                          channels=form.channels, encrypt_offsets=bool(form.encrypt_offsets))
        size = (whole("height", form.height, 8, MAX_SIZE), whole("width", form.width, 8, MAX_SIZE))
        count = whole("batch size", form.num_images, 1, MAX_BATCH)
        seed = whole("seed", form.seed, -1, MAX_SEED)
        seed = None if seed < 0 else seed  # -1: secret noise from a 256-bit key, not recorded
        worker = (form.worker or "").strip() or None
        if worker is not None:
            parse_address(worker, what="worker address")
        model = training_model(host)
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
