"""A tiny random-weight SD1.5 single-file checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD15.

Built from key names and shapes alone (torch + safetensors, no ComfyUI import):

- UNet (``model.diffusion_model.*``): 320 model channels, one level with one res block and one
  transformer block (context 768), middle block res + transformer + res, two output blocks.
  ComfyUI's detection reads these shapes as SD1.5 (``supported_models.SD15``).
- VAE (``first_stage_model.taesd_encoder/decoder.*``): the TAESD architecture (~2.4M parameters),
  which ComfyUI's VAE loader accepts in place of the full AutoencoderKL; ``vae_scale`` 0.18215.
- Text encoder (``cond_stage_model.transformer.text_model.*``): full-size CLIP-L (12 layers, 768),
  because ComfyUI always builds the SD1 CLIP with its fixed config.

Weights are seeded random: norm weights 1, biases 0, other tensors N(0, 1/fan_in).
About 290 MiB in fp16; writing it takes a few seconds.

Also here: a random CLIP ViT-L vision model (CLIPVisionLoader) and a random 4x Real-ESRGAN Compact upscaler
(UpscaleModelLoader, spandrel), both from key names and shapes.

  python tests/comfyui_checkpoint.py OUT.safetensors [--seed N] [--fp32]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

CHANNELS = 320
CONTEXT = 768
TIME_DIM = 4 * CHANNELS
LATENT = 4
TAESD = 64
CLIP_WIDTH = 768
CLIP_LAYERS = 12
CLIP_VOCAB = 49408
CLIP_POSITIONS = 77


def _norm(shapes: dict[str, tuple[int, ...]], name: str, ch: int) -> None:
    shapes[f"{name}.weight"] = (ch,)
    shapes[f"{name}.bias"] = (ch,)


def _linear(shapes: dict[str, tuple[int, ...]], name: str, n_in: int, n_out: int, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _conv(shapes: dict[str, tuple[int, ...]], name: str, n_in: int, n_out: int, k: int = 3, bias: bool = True) -> None:
    shapes[f"{name}.weight"] = (n_out, n_in, k, k)
    if bias:
        shapes[f"{name}.bias"] = (n_out,)


def _resblock(shapes: dict[str, tuple[int, ...]], p: str, n_in: int, n_out: int, time_dim: int = TIME_DIM) -> None:
    """ldm openaimodel.ResBlock (no scale-shift norm)."""
    _norm(shapes, f"{p}.in_layers.0", n_in)
    _conv(shapes, f"{p}.in_layers.2", n_in, n_out)
    _linear(shapes, f"{p}.emb_layers.1", time_dim, n_out)
    _norm(shapes, f"{p}.out_layers.0", n_out)
    _conv(shapes, f"{p}.out_layers.3", n_out, n_out)
    if n_in != n_out:
        _conv(shapes, f"{p}.skip_connection", n_in, n_out, k=1)


def _transformer(shapes: dict[str, tuple[int, ...]], p: str, ch: int) -> None:
    """ldm SpatialTransformer, SD1 flavour, one block; inner dim = ch, context 768."""
    _norm(shapes, f"{p}.norm", ch)
    _conv(shapes, f"{p}.proj_in", ch, ch, k=1)  # SD1.5: conv proj, not linear
    _conv(shapes, f"{p}.proj_out", ch, ch, k=1)
    b = f"{p}.transformer_blocks.0"
    for attn, ctx in (("attn1", ch), ("attn2", CONTEXT)):
        _linear(shapes, f"{b}.{attn}.to_q", ch, ch, bias=False)
        _linear(shapes, f"{b}.{attn}.to_k", ctx, ch, bias=False)
        _linear(shapes, f"{b}.{attn}.to_v", ctx, ch, bias=False)
        _linear(shapes, f"{b}.{attn}.to_out.0", ch, ch)
    _linear(shapes, f"{b}.ff.net.0.proj", ch, 8 * ch)  # GEGLU: 2 x 4*ch
    _linear(shapes, f"{b}.ff.net.2", 4 * ch, ch)
    for i in (1, 2, 3):
        _norm(shapes, f"{b}.norm{i}", ch)


def _unet(shapes: dict[str, tuple[int, ...]]) -> None:
    p = "model.diffusion_model"
    _linear(shapes, f"{p}.time_embed.0", CHANNELS, TIME_DIM)
    _linear(shapes, f"{p}.time_embed.2", TIME_DIM, TIME_DIM)
    _conv(shapes, f"{p}.input_blocks.0.0", LATENT, CHANNELS)
    _resblock(shapes, f"{p}.input_blocks.1.0", CHANNELS, CHANNELS)
    _transformer(shapes, f"{p}.input_blocks.1.1", CHANNELS)
    _resblock(shapes, f"{p}.middle_block.0", CHANNELS, CHANNELS)
    _transformer(shapes, f"{p}.middle_block.1", CHANNELS)
    _resblock(shapes, f"{p}.middle_block.2", CHANNELS, CHANNELS)
    for i in (0, 1):  # each concatenates one skip (320) with the running 320 channels
        _resblock(shapes, f"{p}.output_blocks.{i}.0", 2 * CHANNELS, CHANNELS)
        _transformer(shapes, f"{p}.output_blocks.{i}.1", CHANNELS)
    _norm(shapes, f"{p}.out.0", CHANNELS)
    _conv(shapes, f"{p}.out.2", CHANNELS, LATENT)


def _taesd(shapes: dict[str, tuple[int, ...]]) -> None:
    # Layer indices of comfy/taesd/taesd.py Encoder / Decoder (nn.Sequential); "B" = Block(64, 64).
    enc = ["in", "B", "down", "B", "B", "B", "down", "B", "B", "B", "down", "B", "B", "B", "out"]
    dec = ["clamp", "in", "relu", "B", "B", "B", "up", "conv", "B", "B", "B", "up", "conv",
           "B", "B", "B", "up", "conv", "B", "out"]
    for part, layers, n_in, n_out in (("taesd_encoder", enc, 3, LATENT), ("taesd_decoder", dec, LATENT, 3)):
        for i, kind in enumerate(layers):
            name = f"first_stage_model.{part}.{i}"
            if kind == "B":
                for j in (0, 2, 4):
                    _conv(shapes, f"{name}.conv.{j}", TAESD, TAESD)
            elif kind in ("down", "conv"):
                _conv(shapes, name, TAESD, TAESD, bias=False)
            elif kind == "in":
                _conv(shapes, name, n_in, TAESD)
            elif kind == "out":
                _conv(shapes, name, TAESD, n_out)


def _clip_l(shapes: dict[str, tuple[int, ...]]) -> None:
    p = "cond_stage_model.transformer.text_model"
    w = CLIP_WIDTH
    shapes[f"{p}.embeddings.token_embedding.weight"] = (CLIP_VOCAB, w)
    shapes[f"{p}.embeddings.position_embedding.weight"] = (CLIP_POSITIONS, w)
    for i in range(CLIP_LAYERS):
        lp = f"{p}.encoder.layers.{i}"
        _norm(shapes, f"{lp}.layer_norm1", w)
        _norm(shapes, f"{lp}.layer_norm2", w)
        _linear(shapes, f"{lp}.mlp.fc1", w, 4 * w)
        _linear(shapes, f"{lp}.mlp.fc2", 4 * w, w)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(shapes, f"{lp}.self_attn.{proj}", w, w)
    _norm(shapes, f"{p}.final_layer_norm", w)


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in the tiny SD1.5 checkpoint (scalars excluded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    _unet(shapes)
    _taesd(shapes)
    _clip_l(shapes)
    return shapes


def _is_norm(key: str) -> bool:
    return any(s in key for s in ("norm", "in_layers.0.", "out_layers.0.", "diffusion_model.out.0."))


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Seeded weights for ``shapes``: biases 0, norm weights 1, the rest N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1 and _is_norm(key):
            t = torch.ones(shape)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=gen) * fan_in**-0.5
        sd[key] = t.to(dtype)
    return sd


def tiny_sd15_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Seeded random weights for :func:`checkpoint_shapes`, plus TAESD's ``vae_scale``/``vae_shift``."""
    sd = random_weights(checkpoint_shapes(), seed, dtype)
    # What ComfyUI's VAELoader sets for taesd: latents in ComfyUI are unscaled.
    sd["first_stage_model.vae_scale"] = torch.tensor(0.18215)
    sd["first_stage_model.vae_shift"] = torch.tensor(0.0)
    return sd


def write_tiny_sd15_checkpoint(
    path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16
) -> Path:
    """Write the tiny SD1.5 checkpoint to ``path`` (atomically) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    meta = {"privdiff_tiny": "sd15", "seed": str(seed), "note": "random weights, for tests only"}
    save_file(tiny_sd15_state_dict(seed, dtype), str(tmp), metadata=meta)
    os.replace(tmp, out)
    return out


def clip_vision_vit_l_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a CLIP ViT-L/14 vision model with projection, as ComfyUI's CLIP Vision loader
    detects it (24 layers of width 1024, 224 px, 14 px patches, 768-wide projection)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, projection_dim=768, num_hidden_layers=24,
                              num_attention_heads=16, image_size=224, patch_size=14)
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def write_random_clip_vision(path: str | os.PathLike, seed: int = 0) -> Path:
    """A seeded random CLIP ViT-L vision checkpoint (fp16, ~600 MiB) for ComfyUI's CLIPVisionLoader."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in sorted(clip_vision_vit_l_shapes().items()):
        if key.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1 and ("norm" in key or "layrnorm" in key):
            t = torch.ones(shape)
        else:
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            t = torch.randn(shape, generator=gen) * (fan_in**-0.5 if len(shape) > 1 else 0.02)
        sd[key] = t.to(torch.float16)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata={"note": "random weights, for tests only"})
    os.replace(tmp, out)
    return out


def compact_upscaler_shapes(scale: int = 4, features: int = 16, convs: int = 2) -> dict[str, tuple[int, ...]]:
    """Key names and shapes of a Real-ESRGAN "SRVGGNetCompact" (RGB): conv, PReLU, ``convs`` x (conv, PReLU),
    then a conv to 3·scale² channels before the pixel shuffle. spandrel detects it as "RealESRGAN Compact"."""
    shapes: dict[str, tuple[int, ...]] = {}
    _conv(shapes, "body.0", 3, features)
    shapes["body.1.weight"] = (features,)
    for i in range(convs):
        _conv(shapes, f"body.{2 * i + 2}", features, features)
        shapes[f"body.{2 * i + 3}.weight"] = (features,)
    _conv(shapes, f"body.{2 * convs + 2}", features, 3 * scale * scale)
    return shapes


def write_random_upscaler(path: str | os.PathLike, scale: int = 4, seed: int = 0) -> Path:
    """A seeded random-weight 4x (``scale``) SRVGGNetCompact upscaler (a few KiB) for ComfyUI's upscale_models."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in sorted(compact_upscaler_shapes(scale).items()):
        if key.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:  # PReLU slopes
            t = torch.full(shape, 0.25)
        else:
            t = torch.randn(shape, generator=gen) * (shape[1] * shape[2] * shape[3]) ** -0.5
        sd[key] = t
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata={"note": "random weights, for tests only"})
    os.replace(tmp, out)
    return out


def main() -> None:
    """Command line: write the checkpoint."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="store float32 (default float16)")
    a = ap.parse_args()
    path = write_tiny_sd15_checkpoint(a.out, a.seed, torch.float32 if a.fp32 else torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
