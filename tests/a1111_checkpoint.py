"""A tiny random-weight SD1 checkpoint in the original ldm layout, with the ldm config AUTOMATIC1111 loads for it.

AUTOMATIC1111's webui (v1.10.1) builds the model from a ``.yaml`` of the same name next to the checkpoint, then
loads every tensor from the file (weight initialization is disabled while building, so the file must hold all
of them). Built from key names and shapes alone (torch + safetensors, no ldm or webui import):

- UNet (``model.diffusion_model.*``): 32 model channels, ``channel_mult`` [1, 2], one res block per level,
  a spatial transformer (context 768) at the first level and in the middle block.
- VAE (``first_stage_model.*``): an ldm ``AutoencoderKL`` with ``ch`` 32 and four levels, so it still
  downsamples by 8 (64x64 images, 8x8 latents); one res block per level, attention only in the middle.
- Text encoder (``cond_stage_model.transformer.text_model.*``): full-size CLIP-L (12 layers, 768), because
  the webui builds the SD1 CLIP from the fixed openai/clip-vit-large-patch14 config.
- The diffusion schedule buffers of ``LatentDiffusion`` (``betas``, ``alphas_cumprod``, ...), as in real
  SD1 checkpoints, computed for ldm's linear schedule.

Weights are seeded random: norm weights 1, biases 0, other tensors N(0, 1/fan_in). About 250 MiB in fp16.

  python tests/a1111_checkpoint.py OUT.safetensors [--seed N] [--fp32]

writes OUT.safetensors and OUT.yaml.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def _sibling(name: str):
    """Import a module from this directory by path (works however this file was loaded)."""
    spec = importlib.util.spec_from_file_location(f"_privdiff_tests_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_sd15 = _sibling("comfyui_checkpoint")
_norm, _linear, _conv, _is_norm = _sd15._norm, _sd15._linear, _sd15._conv, _sd15._is_norm

CHANNELS = 32
CHANNEL_MULT = (1, 2)
ATTENTION_RESOLUTIONS = (1,)  # downsampling factors with a spatial transformer (1 = first level)
NUM_HEADS = 8
TIME_DIM = 4 * CHANNELS
CONTEXT = 768
LATENT = 4
VAE_CH = 32
VAE_CH_MULT = (1, 2, 2, 2)  # four levels: three 2x downsamplings, 8x overall
CLIP_POSITIONS = _sd15.CLIP_POSITIONS
TIMESTEPS = 1000
LINEAR_START, LINEAR_END = 0.00085, 0.0120

CONFIG_YAML = f"""\
# Tiny random-weight SD1 for tests (written by privdiff tests/a1111_checkpoint.py); cf. configs/v1-inference.yaml
model:
  base_learning_rate: 1.0e-04
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    linear_start: {LINEAR_START}
    linear_end: {LINEAR_END}
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: {TIMESTEPS}
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 8
    channels: {LATENT}
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 8 # unused
        in_channels: {LATENT}
        out_channels: {LATENT}
        model_channels: {CHANNELS}
        attention_resolutions: {list(ATTENTION_RESOLUTIONS)}
        num_res_blocks: 1
        channel_mult: {list(CHANNEL_MULT)}
        num_heads: {NUM_HEADS}
        use_spatial_transformer: True
        transformer_depth: 1
        context_dim: {CONTEXT}
        use_checkpoint: False
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: {LATENT}
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: {LATENT}
          resolution: 64
          in_channels: 3
          out_ch: 3
          ch: {VAE_CH}
          ch_mult: {list(VAE_CH_MULT)}
          num_res_blocks: 1
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


def _resblock(shapes: dict[str, tuple[int, ...]], p: str, n_in: int, n_out: int) -> None:
    _sd15._resblock(shapes, p, n_in, n_out, time_dim=TIME_DIM)


_transformer = _sd15._transformer


def _unet(shapes: dict[str, tuple[int, ...]]) -> None:
    """The block layout ldm's UNetModel builds for the config above (num_res_blocks 1)."""
    p = "model.diffusion_model"
    _linear(shapes, f"{p}.time_embed.0", CHANNELS, TIME_DIM)
    _linear(shapes, f"{p}.time_embed.2", TIME_DIM, TIME_DIM)
    _conv(shapes, f"{p}.input_blocks.0.0", LATENT, CHANNELS)
    chans, ch, ds, n = [CHANNELS], CHANNELS, 1, 1
    for level, mult in enumerate(CHANNEL_MULT):
        _resblock(shapes, f"{p}.input_blocks.{n}.0", ch, mult * CHANNELS)
        ch = mult * CHANNELS
        if ds in ATTENTION_RESOLUTIONS:
            _transformer(shapes, f"{p}.input_blocks.{n}.1", ch)
        chans.append(ch)
        n += 1
        if level != len(CHANNEL_MULT) - 1:
            _conv(shapes, f"{p}.input_blocks.{n}.0.op", ch, ch)  # Downsample, stride-2 conv
            chans.append(ch)
            ds *= 2
            n += 1
    _resblock(shapes, f"{p}.middle_block.0", ch, ch)
    _transformer(shapes, f"{p}.middle_block.1", ch)
    _resblock(shapes, f"{p}.middle_block.2", ch, ch)
    n = 0
    for level, mult in reversed(list(enumerate(CHANNEL_MULT))):
        for i in range(2):  # num_res_blocks + 1
            _resblock(shapes, f"{p}.output_blocks.{n}.0", ch + chans.pop(), mult * CHANNELS)
            ch, j = mult * CHANNELS, 1
            if ds in ATTENTION_RESOLUTIONS:
                _transformer(shapes, f"{p}.output_blocks.{n}.1", ch)
                j = 2
            if level and i == 1:
                _conv(shapes, f"{p}.output_blocks.{n}.{j}.conv", ch, ch)  # Upsample
                ds //= 2
            n += 1
    _norm(shapes, f"{p}.out.0", ch)
    _conv(shapes, f"{p}.out.2", ch, LATENT)


def _vae_resblock(shapes: dict[str, tuple[int, ...]], p: str, n_in: int, n_out: int) -> None:
    _norm(shapes, f"{p}.norm1", n_in)
    _conv(shapes, f"{p}.conv1", n_in, n_out)
    _norm(shapes, f"{p}.norm2", n_out)
    _conv(shapes, f"{p}.conv2", n_out, n_out)
    if n_in != n_out:
        _conv(shapes, f"{p}.nin_shortcut", n_in, n_out, k=1)


def _vae_mid(shapes: dict[str, tuple[int, ...]], p: str, ch: int) -> None:
    _vae_resblock(shapes, f"{p}.mid.block_1", ch, ch)
    _norm(shapes, f"{p}.mid.attn_1.norm", ch)
    for name in ("q", "k", "v", "proj_out"):
        _conv(shapes, f"{p}.mid.attn_1.{name}", ch, ch, k=1)
    _vae_resblock(shapes, f"{p}.mid.block_2", ch, ch)


def _vae(shapes: dict[str, tuple[int, ...]]) -> None:
    """ldm AutoencoderKL (Encoder/Decoder of ldm.modules.diffusionmodules.model), num_res_blocks 1."""
    enc, dec = "first_stage_model.encoder", "first_stage_model.decoder"
    last = len(VAE_CH_MULT) - 1
    _conv(shapes, f"{enc}.conv_in", 3, VAE_CH)
    ch = VAE_CH
    for i, mult in enumerate(VAE_CH_MULT):
        _vae_resblock(shapes, f"{enc}.down.{i}.block.0", ch, VAE_CH * mult)
        ch = VAE_CH * mult
        if i != last:
            _conv(shapes, f"{enc}.down.{i}.downsample.conv", ch, ch)
    _vae_mid(shapes, enc, ch)
    _norm(shapes, f"{enc}.norm_out", ch)
    _conv(shapes, f"{enc}.conv_out", ch, 2 * LATENT)
    _conv(shapes, "first_stage_model.quant_conv", 2 * LATENT, 2 * LATENT, k=1)
    _conv(shapes, "first_stage_model.post_quant_conv", LATENT, LATENT, k=1)
    ch = VAE_CH * VAE_CH_MULT[-1]
    _conv(shapes, f"{dec}.conv_in", LATENT, ch)
    _vae_mid(shapes, dec, ch)
    for i in reversed(range(len(VAE_CH_MULT))):
        for j in range(2):  # num_res_blocks + 1
            _vae_resblock(shapes, f"{dec}.up.{i}.block.{j}", ch, VAE_CH * VAE_CH_MULT[i])
            ch = VAE_CH * VAE_CH_MULT[i]
        if i != 0:
            _conv(shapes, f"{dec}.up.{i}.upsample.conv", ch, ch)
    _norm(shapes, f"{dec}.norm_out", ch)
    _conv(shapes, f"{dec}.conv_out", ch, 3)


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every weight in the tiny ldm SD1 checkpoint (schedule buffers and position ids excluded)."""
    shapes: dict[str, tuple[int, ...]] = {}
    _unet(shapes)
    _vae(shapes)
    _sd15._clip_l(shapes)
    return shapes


def schedule_buffers() -> dict[str, torch.Tensor]:
    """LatentDiffusion's registered schedule buffers (ldm ``register_schedule``, linear schedule, v_posterior 0)."""
    betas = torch.linspace(LINEAR_START**0.5, LINEAR_END**0.5, TIMESTEPS, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    ac = torch.cumprod(alphas, dim=0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    buffers = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def tiny_ldm_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Seeded random weights for :func:`checkpoint_shapes` (in ``dtype``), plus the float32 schedule buffers and
    CLIP's int64 ``position_ids`` (a persistent buffer in the webui's transformers 4.30)."""
    sd = _sd15.random_weights(checkpoint_shapes(), seed, dtype)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(CLIP_POSITIONS)[None]
    sd.update(schedule_buffers())
    return sd


def write_tiny_a1111_checkpoint(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the checkpoint to ``path`` and its ldm config to ``path`` with suffix ``.yaml`` (both atomically);
    return the checkpoint path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    meta = {"privdiff_tiny": "sd1-ldm", "seed": str(seed), "note": "random weights, for tests only"}
    save_file(tiny_ldm_state_dict(seed, dtype), str(tmp), metadata=meta)
    yaml = out.with_suffix(".yaml")
    yaml_tmp = yaml.with_name(yaml.name + ".tmp")
    yaml_tmp.write_text(CONFIG_YAML)
    os.replace(yaml_tmp, yaml)
    os.replace(tmp, out)
    return out


def main() -> None:
    """Command line: write the checkpoint and its config."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("out", help="checkpoint path (.safetensors); the config goes next to it as .yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    a = ap.parse_args()
    path = write_tiny_a1111_checkpoint(a.out, a.seed, torch.float32 if a.fp32 else torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) and {path.with_suffix('.yaml').name}")


if __name__ == "__main__":
    main()
