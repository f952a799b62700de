"""SDBackend over ComfyUI's own MODEL (ModelPatcher), CLIP and VAE objects.

ComfyUI loads weights as inference tensors and its CLIP layers add in place, so training needs a
session (``training_session``) that loads the models, swaps inference tensors for ordinary ones
with the same values, and makes CLIP's residual adds out of place; the CLIP patch and the weights'
requires_grad flags are undone on exit.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import comfy.clip_model
import comfy.model_base
import comfy.model_management
import torch
from comfy.model_base import ModelType

from privdiff.errors import PrivdiffError
from privdiff.models.init_tokens import pick_init_ids

NATIVE_RESOLUTION = {"SD1": 512, "SD2": 768, "SDXL": 1024}


class ComfyBackend:
    """privdiff's SDBackend protocol for a ComfyUI checkpoint (SD1.x, SD2.x, SDXL)."""

    def __init__(self, model, clip, vae) -> None:
        """``clip`` may be None for sampling only (conditioning then comes from ComfyUI's CONDITIONING)."""
        self.model, self.clip, self.vae = model, clip, vae
        self.base = model.model
        # "l" (SD1), "h" (SD2), "g" + "l" (SDXL); without CLIP, SDXL is told by its size conditioning (adm)
        self._keys = sorted(clip.tokenize("").keys()) if clip is not None else \
            (["g", "l"] if isinstance(self.base, comfy.model_base.SDXL) else ["l"])
        self.encoder_dims = {f"clip_{k}": self._tokenizer(k).embedding_size for k in self._keys} if clip else {}
        if set(self._keys) == {"g", "l"}:
            self.family = "SDXL"
        elif self._keys == ["l"]:
            self.family = "SD1"
        elif self._keys == ["h"]:
            self.family = "SD2"
        else:
            raise PrivdiffError(f"unsupported text encoders {self._keys}: privdiff supports SD1.x, SD2.x and SDXL")
        model_type = self.base.model_type
        if model_type not in (ModelType.EPS, ModelType.V_PREDICTION):
            raise PrivdiffError(f"unsupported model type {model_type.name}: privdiff needs an EPS or V model")
        self.prediction_type = "v_prediction" if model_type == ModelType.V_PREDICTION else "epsilon"
        self.resolution = NATIVE_RESOLUTION[self.family]
        sigmas = model.get_model_object("model_sampling").sigmas.detach().float().clone()
        self._sigmas = sigmas
        self._alphas = 1.0 / (1.0 + sigmas**2)

    def _tokenizer(self, key: str):
        return getattr(self.clip.tokenizer, f"clip_{key}")

    def _text_model(self, key: str):
        return getattr(self.clip.cond_stage_model, f"clip_{key}").transformer

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """ᾱ_t = 1/(1+σ_t²) from ComfyUI's model sampling (equals the training schedule)."""
        return self._alphas.to(self.device)

    @property
    def device(self) -> torch.device:
        """Where ComfyUI runs the UNet."""
        return self.model.load_device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's compute dtype."""
        return self.base.get_dtype()

    @property
    def denoiser(self) -> torch.nn.Module:
        """ComfyUI's ldm UNet (``diffusion_model``)."""
        return self.base.diffusion_model

    def _ids(self, key: str, text: str) -> list[int]:
        """Token ids of ``text`` without start and end tokens."""
        return self._tokenizer(key).tokenizer(text)["input_ids"][1:-1] if text.strip() else []

    def token_vectors(self, word: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """The init word's token embeddings {encoder: float32 [n_vectors, dim]}."""
        out = {}
        for key in self._keys:
            tk = self._tokenizer(key)
            special = {tk.start_token, tk.end_token, tk.pad_token} - {None}
            picked = torch.tensor(pick_init_ids(word, self._ids(key, word), n_vectors, special))
            weight = self._text_model(key).get_input_embeddings().weight
            out[f"clip_{key}"] = weight.detach()[picked.to(weight.device)].float().to(self.device)
        return out

    def _tokens(self, prompt: str, placeholder: str, row: dict[str, torch.Tensor]) -> dict[str, list]:
        """ComfyUI token lists for one prompt, the placeholder replaced by one tensor per vector."""
        if prompt.count(placeholder) != 1:
            raise PrivdiffError(f"prompt {prompt!r} must hold the placeholder {placeholder!r} once")
        before, after = prompt.split(placeholder)
        tokens = {}
        for key in self._keys:
            tk = self._tokenizer(key)
            seq = [(tk.start_token, 1.0)] if tk.start_token is not None else []
            seq += [(i, 1.0) for i in self._ids(key, before)]
            seq += [(v, 1.0) for v in row[f"clip_{key}"]]
            seq += [(i, 1.0) for i in self._ids(key, after)] + [(tk.end_token, 1.0)]
            if len(seq) > tk.max_length:
                raise PrivdiffError(f"prompt {prompt!r} is longer than {tk.max_length} tokens")
            tokens[key] = [seq + [(tk.pad_token, 1.0)] * (tk.max_length - len(seq))]
        return tokens

    def encode_prompts(
        self,
        prompts: list[str],
        placeholder: str,
        vectors: dict[str, torch.Tensor],
        size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning for each prompt with its own vectors (one CLIP call per row)."""
        rows = [{enc: v[b] for enc, v in vectors.items()} for b in range(len(prompts))]
        return self._conditioning([self._tokens(p, placeholder, row) for p, row in zip(prompts, rows, strict=True)],
                                  size)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Conditioning for plain prompts, tokenized as ComfyUI's CLIP Text Encode does."""
        return self._conditioning([self.clip.tokenize(prompt) for prompt in prompts], size)

    def _conditioning(self, tokens: list[dict[str, list]], size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        """The UNet's conditioning for ComfyUI token lists, one prompt each."""
        conds, pooled = [], []
        for row in tokens:
            cond, pool = self.clip.encode_from_tokens(row, return_pooled=True)
            conds.append(cond)
            pooled.append(pool)
        out = {"c_crossattn": torch.cat(conds).to(self.device)}
        if self.base.adm_channels:
            h, w = size or (self.resolution, self.resolution)
            out["y"] = self.base.encode_adm(pooled_output=torch.cat(pooled).to(self.device), width=w, height=h,
                                            crop_w=0, crop_h=0, target_width=w, target_height=h)
        return out

    def predict_noise(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Noise (or v) prediction for DDPM-form latents x_t = √ᾱ x0 + √(1-ᾱ) ε at integer timesteps."""
        t = timesteps.to(self._sigmas.device).long().reshape(-1).expand(len(latents))
        sigma = self._sigmas[t].to(latents.device)
        s = sigma.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
        x = latents * (s**2 + 1).sqrt()  # ComfyUI's k-diffusion input: x0 + σ ε
        denoised = self.base.apply_model(x, sigma, **cond)
        eps = (x - denoised) / s
        if self.prediction_type == "epsilon":
            return eps
        a = 1.0 / (1.0 + s**2)
        return a.sqrt() * eps - (1 - a).sqrt() * denoised

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (ComfyUI's VAE gives the posterior mean; ``generator`` is not needed).

        Encoding never needs gradients, so it runs without them (the VAE keeps inference weights).
        """
        pixels = images.permute(0, 2, 3, 1).float().cpu()
        with torch.no_grad():
            return self.base.process_latent_in(self.vae.encode(pixels).to(self.device)).clone()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in 0..1."""
        return self.vae.decode(self.base.process_latent_out(latents)).permute(0, 3, 1, 2)

    def freeze(self) -> None:
        """Weights get no gradients; ``training_session`` sets and restores this."""
        for module in (self.base, *([self.clip.cond_stage_model] if self.clip is not None else [])):
            module.requires_grad_(False)


def _deinference(module: torch.nn.Module) -> None:
    """Swap inference-mode parameters and buffers for ordinary tensors with the same values."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None and p.is_inference():
                m._parameters[name] = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
        for name, b in list(m._buffers.items()):
            if b is not None and b.is_inference():
                m._buffers[name] = b.clone()


def _out_of_place_forward(layer, x, mask=None, optimized_attention=None):
    x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
    return x + layer.mlp(layer.layer_norm2(x))


@contextmanager
def gradient_session(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Gradients through ComfyUI's loaded ``modules`` inside a prompt: leaves inference mode, swaps their
    inference tensors for ordinary ones, makes CLIP layers (text and vision) add out of place and freezes the
    weights; the layers and the requires_grad flags are restored on exit, even on cancel. Load the models
    through ComfyUI's model management before entering."""
    with torch.inference_mode(False), torch.enable_grad():
        flags = [{name: p.requires_grad for name, p in m.named_parameters()} for m in modules]
        layers = [layer for m in modules for layer in m.modules() if isinstance(layer, comfy.clip_model.CLIPLayer)]
        try:
            for m in modules:
                _deinference(m)
                m.requires_grad_(False)
            for layer in layers:
                layer.forward = functools.partial(_out_of_place_forward, layer)
            yield
        finally:
            for layer in layers:
                layer.__dict__.pop("forward", None)
            for m, saved in zip(modules, flags, strict=True):
                for name, p in m.named_parameters():
                    p.requires_grad_(saved.get(name, False))


@contextmanager
def training_session(model, clip, vae) -> Iterator[ComfyBackend]:
    """A frozen ComfyBackend ready for gradients w.r.t. injected vectors, inside ComfyUI's prompt."""
    with torch.inference_mode(False), torch.enable_grad():
        clip.load_model()
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        with gradient_session([model.model, clip.cond_stage_model]):
            backend = ComfyBackend(model, clip, vae)
            backend.freeze()
            yield backend
