"""Small random-weight SD1.x, SD2.x and SDXL checkpoints in the original single-file key layout, for loader tests.

The layouts are the real ones (ldm/sgm key names, conv or linear transformer projections, OpenCLIP text
encoders, SDXL's ``label_emb``); widths and depths are reduced: UNet 32/64 channels, CLIP 2 layers with the
real 49408-token vocabulary, so CLIP's tokenizer fits. "sd15-full" is the full-size SD1.5 layout.
Built from key names and shapes (no ldm/sgm import).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _sibling(name: str):
    spec = importlib.util.spec_from_file_location(f"_privdiff_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ldm = _sibling("a1111_checkpoint")
_sd15 = _ldm._sd15
_norm, _linear, _conv = _sd15._norm, _sd15._linear, _sd15._conv
Shapes = dict[str, tuple[int, ...]]

VOCAB, POSITIONS, CLIP_LAYERS = 49408, 77, 2
XL_TIME_EMBED = 256


def _transformer(shapes: Shapes, p: str, ch: int, context: int, linear: bool, depth: int) -> None:
    """ldm/sgm SpatialTransformer: ``depth`` blocks, conv (SD1) or linear (SD2, SDXL) projections."""
    _norm(shapes, f"{p}.norm", ch)
    for name in ("proj_in", "proj_out"):
        if linear:
            _linear(shapes, f"{p}.{name}", ch, ch)
        else:
            _conv(shapes, f"{p}.{name}", ch, ch, k=1)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for attn, ctx in (("attn1", ch), ("attn2", context)):
            _linear(shapes, f"{b}.{attn}.to_q", ch, ch, bias=False)
            _linear(shapes, f"{b}.{attn}.to_k", ctx, ch, bias=False)
            _linear(shapes, f"{b}.{attn}.to_v", ctx, ch, bias=False)
            _linear(shapes, f"{b}.{attn}.to_out.0", ch, ch)
        _linear(shapes, f"{b}.ff.net.0.proj", ch, 8 * ch)
        _linear(shapes, f"{b}.ff.net.2", 4 * ch, ch)
        for i in (1, 2, 3):
            _norm(shapes, f"{b}.norm{i}", ch)


def _unet(shapes: Shapes, context: int, linear: bool, depths: tuple[int, ...], adm_in: int = 0,
          channels: int = 32, mult: tuple[int, ...] = (1, 2), res_blocks: int = 1) -> None:
    """ldm/sgm UNetModel; ``depths[level]`` transformer blocks per attention (0: none), the middle has the last."""
    p, time_dim = "model.diffusion_model", 4 * channels
    _linear(shapes, f"{p}.time_embed.0", channels, time_dim)
    _linear(shapes, f"{p}.time_embed.2", time_dim, time_dim)
    if adm_in:
        _linear(shapes, f"{p}.label_emb.0.0", adm_in, time_dim)
        _linear(shapes, f"{p}.label_emb.0.2", time_dim, time_dim)
    _conv(shapes, f"{p}.input_blocks.0.0", 4, channels)
    chans, ch, n = [channels], channels, 1
    for level, m in enumerate(mult):
        for _ in range(res_blocks):
            _sd15._resblock(shapes, f"{p}.input_blocks.{n}.0", ch, m * channels, time_dim)
            ch = m * channels
            if depths[level]:
                _transformer(shapes, f"{p}.input_blocks.{n}.1", ch, context, linear, depths[level])
            chans.append(ch)
            n += 1
        if level != len(mult) - 1:
            _conv(shapes, f"{p}.input_blocks.{n}.0.op", ch, ch)
            chans.append(ch)
            n += 1
    _sd15._resblock(shapes, f"{p}.middle_block.0", ch, ch, time_dim)
    _transformer(shapes, f"{p}.middle_block.1", ch, context, linear, max(depths[-1], 1))
    _sd15._resblock(shapes, f"{p}.middle_block.2", ch, ch, time_dim)
    n = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(res_blocks + 1):
            _sd15._resblock(shapes, f"{p}.output_blocks.{n}.0", ch + chans.pop(), m * channels, time_dim)
            ch, j = m * channels, 1
            if depths[level]:
                _transformer(shapes, f"{p}.output_blocks.{n}.1", ch, context, linear, depths[level])
                j = 2
            if level and i == res_blocks:
                _conv(shapes, f"{p}.output_blocks.{n}.{j}.conv", ch, ch)
            n += 1
    _norm(shapes, f"{p}.out.0", ch)
    _conv(shapes, f"{p}.out.2", ch, 4)


def _vae(shapes: Shapes, ch: int = 32, mult: tuple[int, ...] = (1, 2, 2, 2), res_blocks: int = 1) -> None:
    """ldm AutoencoderKL (4 latent channels, attention only in the middle)."""
    enc, dec, last = "first_stage_model.encoder", "first_stage_model.decoder", len(mult) - 1
    _conv(shapes, f"{enc}.conv_in", 3, ch)
    width = ch
    for i, m in enumerate(mult):
        for r in range(res_blocks):
            _ldm._vae_resblock(shapes, f"{enc}.down.{i}.block.{r}", width, ch * m)
            width = ch * m
        if i != last:
            _conv(shapes, f"{enc}.down.{i}.downsample.conv", width, width)
    _ldm._vae_mid(shapes, enc, width)
    _norm(shapes, f"{enc}.norm_out", width)
    _conv(shapes, f"{enc}.conv_out", width, 8)
    _conv(shapes, "first_stage_model.quant_conv", 8, 8, k=1)
    _conv(shapes, "first_stage_model.post_quant_conv", 4, 4, k=1)
    _conv(shapes, f"{dec}.conv_in", 4, width)
    _ldm._vae_mid(shapes, dec, width)
    for i in reversed(range(len(mult))):
        for r in range(res_blocks + 1):
            _ldm._vae_resblock(shapes, f"{dec}.up.{i}.block.{r}", width, ch * mult[i])
            width = ch * mult[i]
        if i != 0:
            _conv(shapes, f"{dec}.up.{i}.upsample.conv", width, width)
    _norm(shapes, f"{dec}.norm_out", width)
    _conv(shapes, f"{dec}.conv_out", width, 3)


def _openai_clip(shapes: Shapes, p: str, width: int, layers: int = CLIP_LAYERS) -> None:
    """transformers CLIPTextModel layout (SD1 and SDXL's first encoder)."""
    shapes[f"{p}.embeddings.token_embedding.weight"] = (VOCAB, width)
    shapes[f"{p}.embeddings.position_embedding.weight"] = (POSITIONS, width)
    for i in range(layers):
        lp = f"{p}.encoder.layers.{i}"
        _norm(shapes, f"{lp}.layer_norm1", width)
        _norm(shapes, f"{lp}.layer_norm2", width)
        _linear(shapes, f"{lp}.mlp.fc1", width, 4 * width)
        _linear(shapes, f"{lp}.mlp.fc2", 4 * width, width)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(shapes, f"{lp}.self_attn.{proj}", width, width)
    _norm(shapes, f"{p}.final_layer_norm", width)


def _open_clip(shapes: Shapes, p: str, width: int, projection: int) -> None:
    """OpenCLIP text-transformer layout (SD2's encoder, SDXL's second)."""
    shapes[f"{p}.token_embedding.weight"] = (VOCAB, width)
    shapes[f"{p}.positional_embedding"] = (POSITIONS, width)
    for i in range(CLIP_LAYERS):
        lp = f"{p}.transformer.resblocks.{i}"
        _norm(shapes, f"{lp}.ln_1", width)
        _norm(shapes, f"{lp}.ln_2", width)
        shapes[f"{lp}.attn.in_proj_weight"] = (3 * width, width)
        shapes[f"{lp}.attn.in_proj_bias"] = (3 * width,)
        _linear(shapes, f"{lp}.attn.out_proj", width, width)
        _linear(shapes, f"{lp}.mlp.c_fc", width, 4 * width)
        _linear(shapes, f"{lp}.mlp.c_proj", 4 * width, width)
    _norm(shapes, f"{p}.ln_final", width)
    shapes[f"{p}.text_projection"] = (width, projection)


def checkpoint_shapes(family: str) -> Shapes:
    """Key -> shape for "sd1", "sd2", "sdxl" (reduced widths) or "sd15-full" (full-size SD1.5, about 1.07G weights)."""
    shapes: Shapes = {}
    if family == "sd15-full":
        _vae(shapes, ch=128, mult=(1, 2, 4, 4), res_blocks=2)
        _unet(shapes, 768, linear=False, depths=(1, 1, 1, 0), channels=320, mult=(1, 2, 4, 4), res_blocks=2)
        _openai_clip(shapes, "cond_stage_model.transformer.text_model", 768, layers=12)
        return shapes
    _vae(shapes)
    if family == "sd1":
        _unet(shapes, 768, linear=False, depths=(0, 1))
        _openai_clip(shapes, "cond_stage_model.transformer.text_model", 768)
    elif family == "sd2":
        _unet(shapes, 1024, linear=True, depths=(0, 1))
        _open_clip(shapes, "cond_stage_model.model", 1024, 1024)
    else:
        _unet(shapes, 2048, linear=True, depths=(0, 2), adm_in=1280 + 6 * XL_TIME_EMBED)
        _openai_clip(shapes, "conditioner.embedders.0.transformer.text_model", 768)
        _open_clip(shapes, "conditioner.embedders.1.model", 1280, 1280)
    return shapes


def write_checkpoint(path: str | os.PathLike, family: str, seed: int = 0, v_pred: bool = False) -> Path:
    """Write a seeded random checkpoint of ``family`` (float16) to ``path``; ``v_pred`` adds ComfyUI's marker key."""
    sd = _sd15.random_weights(checkpoint_shapes(family), seed, torch.float16)
    if v_pred:
        sd["v_pred"] = torch.tensor([])
    path = Path(path)
    save_file(sd, str(path))
    return path
