"""Small random-weight SD1.x, SD2.x and SDXL checkpoints in the original single-file key layout, for loader tests.

The layouts are the real ones (ldm/sgm key names, conv or linear transformer projections, OpenCLIP text
encoders, SDXL's ``label_emb``); widths and depths are reduced: UNet 32/64 channels, CLIP 2 layers with the
real 49408-token vocabulary, so CLIP's tokenizer fits. Built from key names and shapes (no ldm/sgm import).
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

CHANNELS, MULT = 32, (1, 2)
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


def _unet(shapes: Shapes, context: int, linear: bool, depth: int, adm_in: int = 0) -> None:
    """UNet with two levels (one res block each), attention at the second level and in the middle."""
    p, time_dim = "model.diffusion_model", 4 * CHANNELS
    _linear(shapes, f"{p}.time_embed.0", CHANNELS, time_dim)
    _linear(shapes, f"{p}.time_embed.2", time_dim, time_dim)
    if adm_in:
        _linear(shapes, f"{p}.label_emb.0.0", adm_in, time_dim)
        _linear(shapes, f"{p}.label_emb.0.2", time_dim, time_dim)
    _conv(shapes, f"{p}.input_blocks.0.0", 4, CHANNELS)
    _sd15._resblock(shapes, f"{p}.input_blocks.1.0", CHANNELS, CHANNELS, time_dim)
    _conv(shapes, f"{p}.input_blocks.2.0.op", CHANNELS, CHANNELS)
    top = MULT[-1] * CHANNELS
    _sd15._resblock(shapes, f"{p}.input_blocks.3.0", CHANNELS, top, time_dim)
    _transformer(shapes, f"{p}.input_blocks.3.1", top, context, linear, depth)
    _sd15._resblock(shapes, f"{p}.middle_block.0", top, top, time_dim)
    _transformer(shapes, f"{p}.middle_block.1", top, context, linear, depth)
    _sd15._resblock(shapes, f"{p}.middle_block.2", top, top, time_dim)
    skips = [CHANNELS, CHANNELS, CHANNELS, top]
    for n in range(4):  # two blocks per level, the top level (with attention) first
        out = top if n < 2 else CHANNELS
        _sd15._resblock(shapes, f"{p}.output_blocks.{n}.0", (top if n < 3 else CHANNELS) + skips.pop(), out,
                             time_dim)
        if n < 2:
            _transformer(shapes, f"{p}.output_blocks.{n}.1", out, context, linear, depth)
        if n == 1:
            _conv(shapes, f"{p}.output_blocks.{n}.2.conv", out, out)
    _norm(shapes, f"{p}.out.0", CHANNELS)
    _conv(shapes, f"{p}.out.2", CHANNELS, 4)


def _openai_clip(shapes: Shapes, p: str, width: int) -> None:
    """transformers CLIPTextModel layout (SD1 and SDXL's first encoder)."""
    shapes[f"{p}.embeddings.token_embedding.weight"] = (VOCAB, width)
    shapes[f"{p}.embeddings.position_embedding.weight"] = (POSITIONS, width)
    for i in range(CLIP_LAYERS):
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
    """Key -> shape for "sd1", "sd2" or "sdxl"."""
    shapes: Shapes = {}
    _ldm._vae(shapes)
    if family == "sd1":
        _unet(shapes, 768, linear=False, depth=1)
        _openai_clip(shapes, "cond_stage_model.transformer.text_model", 768)
    elif family == "sd2":
        _unet(shapes, 1024, linear=True, depth=1)
        _open_clip(shapes, "cond_stage_model.model", 1024, 1024)
    else:
        _unet(shapes, 2048, linear=True, depth=2, adm_in=1280 + 6 * XL_TIME_EMBED)
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
