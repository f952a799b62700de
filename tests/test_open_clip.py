"""The open_clip adapter (OpenAI CLIP RN50, as the reference uses), where open_clip imports.

open_clip imports torchvision, which has no working CPU build in some environments (this project's CI
among them): there the test is skipped, and tests/test_cli_guidance.py checks the one-line refusal.
Run it with a Python that has open_clip_torch and torchvision (e.g. a ComfyUI venv).
"""

import pytest
import torch

open_clip = pytest.importorskip("open_clip", exc_type=ImportError)


def test_rn50_from_a_local_file_embeds_differentiably(tmp_path):
    from privdiff.models.image_encoders import load_image_encoder

    model = open_clip.create_model("RN50", pretrained=None)
    path = tmp_path / "RN50.pt"
    torch.save(model.state_dict(), path)
    encoder = load_image_encoder(f"RN50:{path}")
    assert encoder.dim == 1024 and encoder.identity.startswith("open_clip RN50 1024-d")
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    embedding = encoder.embed(images)
    assert embedding.shape == (2, 1024) and torch.isfinite(embedding).all()
    (grad,) = torch.autograd.grad(embedding.sum(), images)
    assert grad.abs().sum() > 0
    assert load_image_encoder(f"RN50:{path}").identity == encoder.identity
