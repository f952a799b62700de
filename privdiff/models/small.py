"""The small reference model: an SD1-architecture pipeline for 32x32 images of shapes, shipped trained.

diffusers components, as in Stable Diffusion 1.x: a CLIP text encoder 768 wide (one layer, frozen
at its seeded random initialisation: the UNet learns to read it), a KL VAE 32x32x3 <-> 4x16x16 and
a conditional UNet with cross-attention, on SD's scaled-linear noise schedule (epsilon prediction).
``python -m privdiff.reference.train`` trains it from the public procedural data; the result ships
in ``privdiff/models/small_weights/`` (fp16) and loads as ``--model small``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from privdiff.errors import PrivdiffError
from privdiff.models.small_spec import SIZE, WEIGHTS, WORDS
from privdiff.models.tiny import DTYPE_KW, MAX_LENGTH, tiny_tokenizer_dir

SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "epsilon",
            "clip_sample": False, "set_alpha_to_one": False}
LEVELS = (16, 8, 4)
"""The UNet's latent sizes, from its first block down."""
CROSS_ATTENTION = (8, 4)
"""The latent sizes whose blocks attend to the text (the middle block always does)."""


def tokenizer() -> CLIPTokenizer:
    """The model's CLIP tokenizer: whole-word tokens for the prompt templates and the caption grammar."""
    with tempfile.TemporaryDirectory(prefix="privdiff-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(tiny_tokenizer_dir(tmp, extra_words=WORDS), local_files_only=True)


def text_encoder(tok: CLIPTokenizer) -> CLIPTextModel:
    """One-layer CLIP text encoder, 768 wide (SD1's embedding width, so embedding files are SD1 files)."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=512, num_hidden_layers=1, num_attention_heads=8,
        max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))


def vae() -> AutoencoderKL:
    """KL autoencoder 32x32 RGB <-> 4x16x16 latents (no attention; the images are simple)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False,
    )


def unet(cross_attention: tuple[int, ...] = CROSS_ATTENTION) -> UNet2DConditionModel:
    """Conditional UNet on 4x16x16 latents: 16 -> 8 -> 4, with cross-attention to the text at the latent sizes in
    ``cross_attention`` (some of 16, 8, 4) and in the middle block."""
    if not set(cross_attention) <= set(LEVELS):
        raise ValueError(f"cross_attention: latent sizes among {LEVELS}, got {cross_attention}")
    attends = [size in cross_attention for size in LEVELS]
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        cross_attention_dim=768, attention_head_dim=(2, 4, 8), norm_num_groups=32,
    )


def pipeline(tok: CLIPTokenizer, encoder: CLIPTextModel, autoencoder: AutoencoderKL,
             denoiser: UNet2DConditionModel) -> StableDiffusionPipeline:
    """Assemble the components into a StableDiffusionPipeline with a DDIM scheduler."""
    return StableDiffusionPipeline(
        vae=autoencoder, text_encoder=encoder, tokenizer=tok, unet=denoiser, scheduler=DDIMScheduler(**SCHEDULE),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def load_small(dtype: torch.dtype | None = None, folder: Path = WEIGHTS) -> StableDiffusionPipeline:
    """The trained reference model from ``folder`` (default: the shipped weights), in float32 unless ``dtype``."""
    if not (folder / "model_index.json").is_file():
        raise PrivdiffError(f"the small reference model is missing from {folder}; rebuild it with "
                            "`python -m privdiff.reference.train`")
    return StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False, low_cpu_mem_usage=False,
        **{DTYPE_KW: dtype or torch.float32},
    )
