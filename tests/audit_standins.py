"""Stand-in models on which an audit's attack has power, for the tests that the audit catches a broken mechanism.

On the tiny random-weight models the attacks find nothing to catch: one image's textual inversion is driven by its
random training draws, not by the image (two trainings of one canary with different keys: cosine 0.00 after 3 and
after 20 steps), and the tiny image encoder maps every mosaic canary to nearly one direction (mean cosine 0.98, in 16
dimensions). These stand-ins keep the release code path whole and make each canary's contribution recognisable.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

SIZE = 32
LATENT = (4, 8, 8)


def _seeded(text: str) -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))


class DenoiserBackend:
    """An SDBackend whose "UNet" denoises exactly toward a latent decoded linearly from the placeholder vectors:
    pred = (z_t - sqrt(a_t) P v) / sqrt(1 - a_t). Textual inversion then learns P v ≈ the image's latent, whatever
    the template, timestep and noise drawn: each image's embedding is its own, up to the training key."""

    family = "SD1"
    encoder_dims = {"clip_l": 768}
    prediction_type = "epsilon"
    resolution = SIZE
    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self) -> None:
        self.alphas_cumprod = torch.linspace(0.999, 0.05, 50)
        self._decoders: dict[int, torch.Tensor] = {}

    def _decoder(self, width: int) -> torch.Tensor:
        if width not in self._decoders:
            self._decoders[width] = torch.randn(width, LATENT[0] * LATENT[1] * LATENT[2],
                                                generator=_seeded(f"P{width}")) / width**0.5
        return self._decoders[width]

    def token_vectors(self, word: str, n_vectors: int) -> dict[str, torch.Tensor]:
        return {"clip_l": 0.02 * torch.randn(n_vectors, 768, generator=_seeded(word))}

    def encode_prompts(self, prompts, placeholder, vectors, size=None) -> dict[str, torch.Tensor]:
        return {"clip_l": vectors["clip_l"]}

    def predict_noise(self, latents, timesteps, cond) -> torch.Tensor:
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        flat = cond["clip_l"].flatten(1)
        decoded = (flat @ self._decoder(flat.shape[1])).view(-1, *LATENT)
        return (latents - a.sqrt() * decoded) / (1 - a).sqrt()

    def encode_images(self, images, generator=None) -> torch.Tensor:
        pooled = F.avg_pool2d(images.float() - 0.5, images.shape[-1] // LATENT[1])
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * 4

    def decode_latents(self, latents) -> torch.Tensor:
        return F.interpolate(latents[:, :3] / 4 + 0.5, size=(SIZE, SIZE)).clamp(0, 1)

    def freeze(self) -> None:
        pass


class RandomFeatureEncoder:
    """An ImageEncoder: a fixed random projection of the centred pixels to 1024 dimensions (random mosaics land in
    nearly orthogonal directions)."""

    dim = 1024
    size = SIZE
    identity = "random features 1024-d (tests)"

    def __init__(self) -> None:
        self.projection = torch.randn(3 * SIZE * SIZE, self.dim, generator=_seeded("features")) / (3 * SIZE**2)**0.5

    def to(self, device) -> RandomFeatureEncoder:
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - 0.5).flatten(1) @ self.projection
