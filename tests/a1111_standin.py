"""A stand-in for the parts of A1111's loaded model (``shared.sd_model``) that the extension's adapter
touches, built over a tiny diffusers pipeline so results can be compared with ``DiffusersBackend``.

- SD1: ``cond_stage_model`` is a text wrapper like A1111's ``FrozenCLIPEmbedderWithCustomWords``
  (``tokenize``, ``encode_with_transformers``, ``id_start``/``id_end``/``id_pad``, ``wrapped.tokenizer``,
  ``wrapped.transformer``), with A1111's ``EmbeddingsWithFixes`` wrapped around the token embedding.
- SDXL: ``conditioner.embedders`` holds the two text wrappers (the second returns ``z.pooled``) and three
  size embedders; here they pass the sizes through unembedded and the UNet stand-in hands them to the
  diffusers UNet as ``time_ids`` (A1111's sgm UNet embeds them itself; the adapter only concatenates).
- ``model.diffusion_model(x, timesteps=, context=, y=)``, ``first_stage_model.encode/decode`` (encode
  returns a posterior with ``mean`` and ``std``, like ldm's ``DiagonalGaussianDistribution``),
  ``scale_factor``, ``alphas_cumprod``, ``parameterization``.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from torch import nn


class EmbeddingsWithFixes(nn.Module):
    """A1111's hijack around the token embedding: ``wrapped`` is the original layer."""

    def __init__(self, wrapped: nn.Embedding) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wrapped(input_ids)


class _Inner(nn.Module):
    def __init__(self, tokenizer, transformer: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.transformer = transformer


class TextWrapper(nn.Module):
    """A1111's text wrapper: ``layer`` "last" (SD1) or "penultimate" (SDXL), ``pooled`` for clip_g."""

    def __init__(self, tokenizer, transformer: nn.Module, layer: str = "last", pooled: bool = False) -> None:
        super().__init__()
        self.wrapped = _Inner(tokenizer, transformer)
        transformer.set_input_embeddings(EmbeddingsWithFixes(transformer.get_input_embeddings()))
        self.layer, self.pooled, self.input_key = layer, pooled, "txt"
        self.id_start, self.id_end, self.id_pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def encode_with_transformers(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.wrapped.transformer(input_ids=tokens, output_hidden_states=True)
        z = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        if self.pooled:
            z.pooled = out.text_embeds
        return z


class SizeEmbedder(nn.Module):
    """An sgm size embedder stand-in: passes its two numbers through."""

    def __init__(self, input_key: str) -> None:
        super().__init__()
        self.input_key = input_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


class Conditioner(nn.Module):
    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class UNet(nn.Module):
    """ldm/sgm ``UNetModel`` call convention over a diffusers UNet."""

    def __init__(self, unet: nn.Module, pooled_dim: int | None) -> None:
        super().__init__()
        self.unet, self.pooled_dim = unet, pooled_dim
        self.in_channels = unet.config.in_channels

    def forward(self, x, timesteps=None, context=None, y=None):
        added = None
        if self.pooled_dim is not None:
            added = {"text_embeds": y[:, :self.pooled_dim], "time_ids": y[:, self.pooled_dim:]}
        return self.unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added).sample


class Posterior:
    def __init__(self, dist) -> None:
        self.mean, self.std = dist.mean, dist.std


class FirstStage(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def encode(self, x: torch.Tensor) -> Posterior:
        return Posterior(self.vae.encode(x).latent_dist)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z).sample


class Wrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


class StandInModel(nn.Module):
    """``shared.sd_model`` over ``pipe`` (a tiny SD1 or SDXL diffusers pipeline), sharing its weights."""

    def __init__(self, pipe, parameterization: str = "eps") -> None:
        super().__init__()
        xl = isinstance(pipe, StableDiffusionXLPipeline)
        self.is_sdxl, self.is_sd2, self.is_sd1 = xl, False, not xl
        if xl:
            self.conditioner = Conditioner([
                TextWrapper(pipe.tokenizer, pipe.text_encoder, layer="penultimate"),
                TextWrapper(pipe.tokenizer_2, pipe.text_encoder_2, layer="penultimate", pooled=True),
                SizeEmbedder("original_size_as_tuple"), SizeEmbedder("crop_coords_top_left"),
                SizeEmbedder("target_size_as_tuple"),
            ])
        else:
            self.cond_stage_model = TextWrapper(pipe.tokenizer, pipe.text_encoder)
        pooled = pipe.text_encoder_2.config.projection_dim if xl else None
        self.model = Wrapper(UNet(pipe.unet, pooled))
        self.first_stage_model = FirstStage(pipe.vae)
        self.scale_factor = pipe.vae.config.scaling_factor
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod)
