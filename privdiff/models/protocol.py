"""The SDBackend protocol: everything privdiff's algorithms need from a Stable Diffusion model."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class SDBackend(Protocol):
    """A Stable Diffusion model seen through trainable placeholder vectors.

    Encoder keys are "clip_l" (768 wide: SD1's encoder and SDXL's first), "clip_g" (SDXL's second,
    1280) and "clip_h" (SD2's single 1024-wide encoder).
    """

    family: str
    """"SD1", "SD2" or "SDXL"."""
    encoder_dims: dict[str, int]
    """Embedding width per text encoder, e.g. {"clip_l": 768} or {"clip_l": 768, "clip_g": 1280}."""
    prediction_type: str
    """What the UNet predicts: "epsilon" or "v_prediction"."""
    resolution: int
    """Native image side in pixels (512 for SD1, 1024 for SDXL, 32 for the tiny models)."""

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """Training noise schedule ᾱ_t, float32 [T] on ``device``."""
        ...

    @property
    def device(self) -> torch.device:
        """Device of the UNet."""
        ...

    @property
    def denoiser(self) -> torch.nn.Module:
        """The UNet module that ``predict_noise`` runs (DP-LoRA puts its adapters in its transformer blocks).
        Module paths are diffusers' (``down_blocks.1.attentions.0...``) or the original ldm layout's
        (``input_blocks.4.1...``, ComfyUI and A1111); LoRA files name layers by these paths, and every loader
        reads both."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype of the UNet."""
        ...

    def token_vectors(self, word: str, n_vectors: int) -> dict[str, torch.Tensor]:
        """Initial vectors {encoder: float32 [n_vectors, dim]} from the word's token embeddings.

        The word's tokens are repeated or subsampled to ``n_vectors`` (as A1111 does); an empty word
        or one that tokenizes to special tokens raises PrivdiffError.
        """
        ...

    def encode_prompts(
        self,
        prompts: list[str],
        placeholder: str,
        vectors: dict[str, torch.Tensor],
        size: tuple[int, int] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Conditioning for ``prompts``, each holding ``placeholder`` once, replaced by its vectors.

        ``vectors[enc]`` is [B, n, dim], row b for prompt b; the result is differentiable in them.
        ``size`` (height, width) sets SDXL's size conditioning; default (resolution, resolution).
        """
        ...

    def encode_text(self, prompts: list[str], size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Conditioning for plain prompts (no placeholder), without gradients."""
        ...

    def predict_noise(self, latents: torch.Tensor, timesteps: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """UNet output (noise or v, see ``prediction_type``) for latents [B,4,h,w] at int timesteps [B]."""
        ...

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled VAE latents (a sample of the latent distribution) of images [B,3,H,W] in 0..1."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images [B,3,H,W] in 0..1 from scaled latents."""
        ...

    def freeze(self) -> None:
        """Set requires_grad False on every model weight and put the models in eval mode."""
        ...
