"""SDBackend over AUTOMATIC1111's loaded model (``shared.sd_model``): SD1.x, SD2.x and SDXL.

A1111 runs Stable Diffusion through CompVis ``ldm`` (SD1/SD2: ``LatentDiffusion``) and Stability's ``sgm``
(SDXL: ``DiffusionEngine``) code, with its own text-encoder wrappers (``FrozenCLIPEmbedderWithCustomWords``
and kin) around the CLIP models. The adapter touches only:

- the text wrappers: ``cond_stage_model`` (SD1/SD2) or the ``txt`` embedders of ``conditioner.embedders``
  (SDXL); each has ``tokenize``, ``encode_with_transformers``, ``id_start``/``id_end``/``id_pad`` and
  ``wrapped`` (a transformers CLIP with ``transformer``, or an OpenCLIP with ``model``);
- ``model.diffusion_model`` (called as ``unet(x, timesteps=t, context=c, y=vector)``);
- ``first_stage_model`` (``encode``/``decode``) and ``scale_factor``;
- ``alphas_cumprod`` and ``parameterization`` ("eps" or "v").

Text goes through A1111's own ``encode_with_transformers`` (so CLIP skip and SDXL's layer choice are the
user's settings), with the placeholder vectors injected by a forward hook on the token-embedding layer
that is removed after each call. :func:`training_session` restores every weight's ``requires_grad`` and
every module's train/eval mode on exit, so txt2img afterwards is unchanged. No A1111 import here: CI runs
it against a stand-in.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from privdiff.errors import PrivdiffError
from privdiff.models.init_tokens import pick_init_ids
from privdiff.models.inject import inject_vectors, slot_columns

CONTEXT = 77
_KEY_BY_WIDTH = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
_VECTOR, _CROSSATTN = "vector", "crossattn"


def _token_embedding(wrapper: nn.Module) -> nn.Module:
    """The token-embedding layer of an A1111 text wrapper (possibly A1111's ``EmbeddingsWithFixes``)."""
    inner = wrapper.wrapped
    if hasattr(inner, "transformer"):
        return inner.transformer.get_input_embeddings()
    if hasattr(inner, "model"):
        return inner.model.token_embedding
    raise PrivdiffError(f"unsupported text encoder {type(inner).__name__}: privdiff trains CLIP and OpenCLIP only")


def _embedding_weight(layer: nn.Module) -> torch.Tensor:
    """The vocabulary matrix under a token-embedding layer, through A1111's wrapper if there is one."""
    return layer.weight if isinstance(layer, nn.Embedding) else layer.wrapped.weight


def family_of(sd_model: nn.Module) -> str:
    """"SD1", "SD2" or "SDXL" from A1111's flags, else from the model's structure; refuses the others."""
    if getattr(sd_model, "is_sd3", False):
        raise PrivdiffError("SD3 models are not supported yet: load an SD1.x, SD2.x or SDXL checkpoint")
    if getattr(sd_model, "is_sdxl", False) or hasattr(sd_model, "conditioner"):
        return "SDXL"
    cond = getattr(sd_model, "cond_stage_model", None)
    if cond is None or not hasattr(cond, "encode_with_transformers"):
        raise PrivdiffError(f"unsupported model {type(sd_model).__name__}: no A1111 text encoder wrapper")
    return "SD2" if getattr(sd_model, "is_sd2", False) or hasattr(cond.wrapped, "model") else "SD1"


class A1111Backend:
    """SDBackend for A1111's ``shared.sd_model``; ``resolution`` defaults to the family's native size."""

    def __init__(self, sd_model: nn.Module, resolution: int | None = None) -> None:
        self.sd_model = sd_model
        self.family = family_of(sd_model)
        self.unet = sd_model.model.diffusion_model
        if getattr(self.unet, "in_channels", 4) != 4:
            raise PrivdiffError(f"this checkpoint's UNet takes {self.unet.in_channels} channels (inpainting or "
                                "instruct model); load an ordinary txt2img checkpoint")
        if self.family == "SDXL":
            texts = [e for e in sd_model.conditioner.embedders if getattr(e, "input_key", None) == "txt"]
        else:
            texts = [sd_model.cond_stage_model]
        self._wrappers: dict[str, nn.Module] = {}
        for wrapper in texts:
            width = _embedding_weight(_token_embedding(wrapper)).shape[1]
            if width not in _KEY_BY_WIDTH or _KEY_BY_WIDTH[width] in self._wrappers:
                raise PrivdiffError(f"unsupported text encoder width {width} in this {self.family} model")
            self._wrappers[_KEY_BY_WIDTH[width]] = wrapper
        self.encoder_dims = {k: _embedding_weight(_token_embedding(w)).shape[1] for k, w in self._wrappers.items()}
        parameterization = getattr(sd_model, "parameterization", "eps")
        if parameterization not in ("eps", "v"):
            raise PrivdiffError(f"unsupported parameterization {parameterization!r} (expected eps or v)")
        self.prediction_type = "v_prediction" if parameterization == "v" else "epsilon"
        native = {"SDXL": 1024, "SD2": 768 if parameterization == "v" else 512, "SD1": 512}[self.family]
        self.resolution = resolution or native
        schedule = getattr(sd_model, "alphas_cumprod_original", None)
        self._alphas = (schedule if schedule is not None else sd_model.alphas_cumprod).detach().float().cpu()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's training schedule ᾱ_t (A1111's full-precision copy where it keeps one)."""
        return self._alphas.to(self.device)

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The UNet's weight dtype."""
        return next(self.unet.parameters()).dtype

    @property
    def denoiser(self) -> nn.Module:
        """The checkpoint's ldm UNet (``model.diffusion_model``)."""
        return self.unet

    def _ids(self, wrapper: nn.Module, text: str) -> list[int]:
        return list(wrapper.tokenize([text])[0]) if text.strip() else []

    def token_vectors(self, word: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """The init word's token embeddings {encoder: float32 [n_vectors, dim]}."""
        out = {}
        for key, wrapper in self._wrappers.items():
            special = {wrapper.id_start, wrapper.id_end, wrapper.id_pad}
            picked = torch.tensor(pick_init_ids(word, self._ids(wrapper, word), n_vectors, special))
            weight = _embedding_weight(_token_embedding(wrapper))
            out[key] = weight.detach()[picked.to(weight.device)].float().cpu()
        return out

    def _tokens(self, wrapper: nn.Module, prompts: list[str], placeholder: str | None,
                n: int) -> tuple[torch.Tensor, list[int]]:
        """Token ids [B, 77] as A1111 lays out one chunk (start, text, end, padding), with ``n`` slots
        holding the start id where the placeholder stood, and each row's first slot."""
        rows, starts = [], []
        for prompt in prompts:
            if placeholder is None:
                before, after = prompt, ""
            elif prompt.count(placeholder) != 1:
                raise PrivdiffError(f"prompt {prompt!r} must hold the placeholder {placeholder!r} once")
            else:
                before, after = prompt.split(placeholder)
            ids = [wrapper.id_start, *self._ids(wrapper, before)]
            starts.append(len(ids))
            ids += [wrapper.id_start] * n + self._ids(wrapper, after) + [wrapper.id_end]
            if len(ids) > CONTEXT:
                raise PrivdiffError(f"prompt {prompt!r} is longer than the text encoder's {CONTEXT} tokens")
            rows.append(ids + [wrapper.id_pad] * (CONTEXT - len(ids)))
        return torch.tensor(rows), starts

    def _encode(self, key: str, prompts: list[str], placeholder: str | None,
                vectors: torch.Tensor | None) -> torch.Tensor:
        """One wrapper's ``encode_with_transformers`` output (with ``.pooled`` for SDXL's second encoder)."""
        wrapper = self._wrappers[key]
        n = 0 if vectors is None else vectors.shape[1]
        ids, starts = self._tokens(wrapper, prompts, placeholder, n)
        layer = _token_embedding(wrapper)
        ids = ids.to(_embedding_weight(layer).device)
        if vectors is None:
            return wrapper.encode_with_transformers(ids)
        rows, cols = slot_columns(starts, n)
        with inject_vectors(layer, rows, cols, vectors.reshape(len(prompts) * n, -1)):
            return wrapper.encode_with_transformers(ids)

    def _conditioning(self, prompts: list[str], placeholder: str | None,
                      vectors: dict[str, torch.Tensor] | None, size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        if self.family != "SDXL":
            (key,) = self._wrappers
            z = self._encode(key, prompts, placeholder, None if vectors is None else vectors[key])
            return {_CROSSATTN: z}
        return self._sdxl_conditioning(prompts, placeholder, vectors, size)

    def _sdxl_conditioning(self, prompts: list[str], placeholder: str | None,
                           vectors: dict[str, torch.Tensor] | None,
                           size: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        """What sgm's ``GeneralConditioner`` returns for these prompts at ``size`` (crop (0, 0))."""
        h, w = size or (self.resolution, self.resolution)
        b, device = len(prompts), self.device
        inputs = {"original_size_as_tuple": torch.tensor([[h, w]] * b, device=device),
                  "crop_coords_top_left": torch.zeros(b, 2, device=device),
                  "target_size_as_tuple": torch.tensor([[h, w]] * b, device=device)}
        parts: dict[str, list[torch.Tensor]] = {_VECTOR: [], _CROSSATTN: []}
        keys = iter(self._wrappers)
        for embedder in self.sd_model.conditioner.embedders:
            if getattr(embedder, "input_key", None) == "txt":
                key = next(keys)
                z = self._encode(key, prompts, placeholder, None if vectors is None else vectors[key])
                outputs = [z] + ([z.pooled] if getattr(z, "pooled", None) is not None else [])
            elif embedder.input_key in inputs:
                outputs = [embedder(inputs[embedder.input_key])]
            else:
                raise PrivdiffError(f"unsupported SDXL conditioning {embedder.input_key!r} (refiner models are "
                                    "not supported)")
            for out in outputs:
                parts[_VECTOR if out.dim() == 2 else _CROSSATTN].append(out)
        return {_CROSSATTN: torch.cat(parts[_CROSSATTN], dim=2), _VECTOR: torch.cat(parts[_VECTOR], dim=1)}

    def encode_prompts(
        self,
        prompts: list[str],
        placeholder: str,
        vectors: dict[str, torch.Tensor],
        size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning for each prompt with its own vectors ``vectors[enc][b]`` [n, dim] at the placeholder."""
        if set(vectors) != set(self._wrappers):
            raise PrivdiffError(f"vectors for {sorted(vectors)} given; this {self.family} model needs "
                                f"{sorted(self._wrappers)}")
        return self._conditioning(prompts, placeholder, vectors, size)

    @torch.no_grad()
    def encode_text(self, prompts: list[str], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Conditioning for plain prompts (no placeholder; one chunk of 75 tokens each)."""
        return self._conditioning(prompts, None, None, size)

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """UNet output (noise or v) for latents [B,4,h,w] at integer timesteps [B]."""
        dtype, device = self.dtype, self.device
        t = timesteps.to(device).long().reshape(-1).expand(len(latents))
        vector = cond.get(_VECTOR)
        return self.unet(latents.to(device, dtype), timesteps=t, context=cond[_CROSSATTN].to(device, dtype),
                         y=None if vector is None else vector.to(device, dtype))

    @property
    def _scale(self) -> float:
        return float(self.sd_model.scale_factor)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: a sample of the VAE posterior (ldm's ``DiagonalGaussianDistribution``) drawn
        with ``generator``, or the VAE's own output where it returns a tensor (sgm)."""
        vae = self.sd_model.first_stage_model
        weight = next(vae.parameters())
        posterior = vae.encode(images.to(weight.device, weight.dtype) * 2 - 1)
        if isinstance(posterior, torch.Tensor):
            z = posterior
        else:
            noise = torch.randn(posterior.mean.shape, generator=generator, device=generator.device if generator
                                else "cpu").to(posterior.mean)
            z = posterior.mean + posterior.std * noise
        return z.float() * self._scale

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in 0..1 from scaled latents."""
        vae = self.sd_model.first_stage_model
        weight = next(vae.parameters())
        x = vae.decode(latents.to(weight.device, weight.dtype) / self._scale)
        return ((x.float() + 1) / 2).clamp(0, 1)

    def freeze(self) -> None:
        """No gradients for any weight, every module in eval mode (:func:`training_session` restores both)."""
        self.sd_model.requires_grad_(False)
        self.sd_model.eval()


@contextmanager
def training_session(sd_model: nn.Module, resolution: int | None = None) -> Iterator[A1111Backend]:
    """A frozen backend with gradients enabled (A1111 may call from a no-grad or inference-mode context);
    each weight's ``requires_grad`` and each module's training flag are restored on exit, even on error."""
    flags = {name: p.requires_grad for name, p in sd_model.named_parameters()}
    modes = {name: m.training for name, m in sd_model.named_modules()}
    try:
        with torch.inference_mode(False), torch.enable_grad():
            backend = A1111Backend(sd_model, resolution)
            backend.freeze()
            yield backend
    finally:
        for name, p in sd_model.named_parameters():
            p.requires_grad_(flags.get(name, False))
        for name, m in sd_model.named_modules():
            m.training = modes.get(name, False)
