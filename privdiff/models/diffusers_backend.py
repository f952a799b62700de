"""SDBackend over a diffusers StableDiffusionPipeline or StableDiffusionXLPipeline.

Placeholder vectors are injected by ``privdiff.models.inject`` (a forward hook on the token-embedding
layer, tokenizer and weights untouched). The slots hold the BOS id, which is neither EOS nor above it,
so the pooled output is taken at the prompt's EOS whether the encoder finds EOS by id or by argmax.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from privdiff.errors import PrivdiffError
from privdiff.models.init_tokens import pick_init_ids
from privdiff.models.inject import inject_vectors, slot_columns

_KEY_BY_WIDTH = {768: "clip_l", 1024: "clip_h"}
_FAMILY_BY_WIDTH = {768: "SD1", 1024: "SD2"}


class DiffusersBackend:
    """SDBackend for diffusers SD1.x/SD2.x and SDXL base pipelines."""

    def __init__(self, pipe: StableDiffusionPipeline | StableDiffusionXLPipeline) -> None:
        self.pipe = pipe
        if isinstance(pipe, StableDiffusionXLPipeline):
            if pipe.text_encoder is None:
                raise PrivdiffError("SDXL pipelines without a first text encoder (refiners) are unsupported")
            self.family = "SDXL"
            self._encoders = {"clip_l": (pipe.tokenizer, pipe.text_encoder),
                              "clip_g": (pipe.tokenizer_2, pipe.text_encoder_2)}
        else:
            width = pipe.text_encoder.config.hidden_size
            if width not in _KEY_BY_WIDTH:
                raise PrivdiffError(f"unsupported text encoder width {width} (expected 768 or 1024)")
            self.family = _FAMILY_BY_WIDTH[width]
            self._encoders = {_KEY_BY_WIDTH[width]: (pipe.tokenizer, pipe.text_encoder)}
        self.encoder_dims = {k: enc.config.hidden_size for k, (_, enc) in self._encoders.items()}
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise PrivdiffError(f"unsupported prediction type {self.prediction_type!r}")
        self.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
        self._alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.float()

    @property
    def device(self) -> torch.device:
        """Device of the UNet (of its first parameter: diffusers' own ``unet.device`` walks every module for
        offloading hooks, which privdiff never installs, and cost a batched TI step ~10% in such lookups)."""
        return next(self.pipe.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the UNet (of its first parameter, as ``device``)."""
        return next(self.pipe.unet.parameters()).dtype

    @property
    def denoiser(self) -> torch.nn.Module:
        """The pipeline's UNet."""
        return self.pipe.unet

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Training noise schedule ᾱ_t (the DDPM equivalent of the pipeline's scheduler), float32 [T]."""
        return self._alphas_cumprod.to(self.device)

    def token_vectors(self, word: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """Initial vectors {encoder: float32 [n_vectors, dim]} from the word's token embeddings."""
        out = {}
        for key, (tokenizer, encoder) in self._encoders.items():
            ids = tokenizer(word, add_special_tokens=False).input_ids if word.strip() else []
            picked = torch.tensor(pick_init_ids(word, ids, n_vectors, set(tokenizer.all_special_ids)))
            weight = encoder.get_input_embeddings().weight
            out[key] = weight.detach()[picked.to(weight.device)].float().clone()
        return out

    def _slot_ids(self, tokenizer, prompts: list[str], placeholder: str,
                  n: int) -> tuple[torch.Tensor, list[int]]:
        """Token ids [B, L] with ``n`` BOS-filled slots for the placeholder, and each row's first slot."""
        length = tokenizer.model_max_length
        rows, starts = [], []
        for prompt in prompts:
            pieces = prompt.split(placeholder)
            if len(pieces) != 2:
                raise PrivdiffError(f"prompt {prompt!r} must hold placeholder {placeholder!r} exactly once")
            before, after = (tokenizer(p, add_special_tokens=False).input_ids if p.strip() else []
                             for p in pieces)
            start = 1 + len(before)
            if start + n > length - 1:
                raise PrivdiffError(f"prompt {prompt!r} is too long: the placeholder would be truncated at "
                                    f"{length} tokens")
            ids = [tokenizer.bos_token_id, *before, *[tokenizer.bos_token_id] * n, *after][: length - 1]
            ids.append(tokenizer.eos_token_id)
            rows.append(ids + [tokenizer.pad_token_id] * (length - len(ids)))
            starts.append(start)
        return torch.tensor(rows), starts

    def _encode(self, key: str, prompts: list[str], placeholder: str, vecs: torch.Tensor):
        """Run one text encoder on the prompts with the vectors injected at the placeholder slots."""
        tokenizer, encoder = self._encoders[key]
        b, n, _ = vecs.shape
        ids, starts = self._slot_ids(tokenizer, prompts, placeholder, n)
        rows, cols = slot_columns(starts, n)
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (torch.arange(ids.shape[1]) <= (ids == tokenizer.eos_token_id).int().argmax(1)[:, None])
            mask = mask.long().to(encoder.device)
        embedding = encoder.get_input_embeddings()
        with inject_vectors(embedding, rows, cols, vecs.reshape(b * n, -1)):
            xl = self.family == "SDXL"
            return encoder(ids.to(encoder.device), attention_mask=mask, output_hidden_states=xl)

    def encode_prompts(
        self,
        prompts: list[str],
        placeholder: str,
        vectors: dict[str, torch.Tensor],
        size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning for ``predict_noise``; prompt b's placeholder becomes ``vectors[enc][b]`` [n, dim].

        SD1/SD2: {"encoder_hidden_states"} (last hidden state). SDXL: penultimate hidden states of both
        encoders concatenated, plus "text_embeds" (pooled, projected) and "time_ids" (original size,
        crop (0, 0), target size), exactly as StableDiffusionXLPipeline conditions.
        """
        if set(vectors) != set(self._encoders):
            raise PrivdiffError(f"vectors for {sorted(vectors)} given; this {self.family} model needs "
                                f"{sorted(self._encoders)}")
        shapes = {k: tuple(v.shape) for k, v in vectors.items()}
        ok = all(len(s) == 3 and s[0] == len(prompts) and s[1] >= 1 and s[2] == self.encoder_dims[k]
                 for k, s in shapes.items())
        if not ok or len({s[1] for s in shapes.values()}) != 1:
            raise PrivdiffError(f"vectors of shapes {shapes} do not match {len(prompts)} prompts and widths "
                                f"{self.encoder_dims}")
        if self.family != "SDXL":
            (key,) = self._encoders
            out = self._encode(key, prompts, placeholder, vectors[key])
            return {"encoder_hidden_states": out.last_hidden_state.to(self.dtype)}
        hidden, pooled = [], None
        for key in self._encoders:
            out = self._encode(key, prompts, placeholder, vectors[key])
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
        height, width = size or (self.resolution, self.resolution)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(self.dtype),
                "text_embeds": pooled.to(self.dtype), "time_ids": time_ids.expand(len(prompts), -1)}

    @torch.no_grad()
    def encode_text(self, prompts: list[str], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Conditioning for plain ``prompts`` (no placeholder), in the form :meth:`encode_prompts` returns."""
        device = self.device
        if self.family != "SDXL":
            hidden = self.pipe.encode_prompt(prompts, device, 1, False)[0]
            return {"encoder_hidden_states": hidden.to(self.dtype)}
        hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                       do_classifier_free_guidance=False)
        height, width = size or (self.resolution, self.resolution)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=device)
        return {"encoder_hidden_states": hidden.to(self.dtype), "text_embeds": pooled.to(self.dtype),
                "time_ids": time_ids.expand(len(prompts), -1)}

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """UNet prediction (noise or v) for latents [B,4,h,w] at integer timesteps [B] (or a scalar)."""
        hidden = cond["encoder_hidden_states"]
        if hidden.shape[0] != latents.shape[0]:
            raise ValueError(f"conditioning batch {hidden.shape[0]} != latents batch {latents.shape[0]}")
        added = ({"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
                 if self.family == "SDXL" else None)
        return self.pipe.unet(latents.to(self.device, self.dtype), timesteps.to(self.device),
                              encoder_hidden_states=hidden, added_cond_kwargs=added).sample

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents: a sample of the VAE's latent distribution for images [B,3,H,W] in 0..1."""
        vae = self.pipe.vae
        x = images.to(vae.device, vae.dtype) * 2 - 1
        z = vae.encode(x).latent_dist.sample(generator)
        shift = vae.config.get("shift_factor") or 0.0
        return (z - shift) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in 0..1 from scaled latents."""
        vae = self.pipe.vae
        shift = vae.config.get("shift_factor") or 0.0
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
        return ((vae.decode(z).sample + 1) / 2).clamp(0, 1)

    def freeze(self) -> None:
        """Set requires_grad False on every model weight and put the models in eval mode."""
        for _, encoder in self._encoders.values():
            encoder.requires_grad_(False).eval()
        self.pipe.unet.requires_grad_(False).eval()
        self.pipe.vae.requires_grad_(False).eval()
