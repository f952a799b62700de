"""The A1111 adapter (extension/a1111_backend.py) against a stand-in of A1111's loaded model.

The stand-in shares a tiny diffusers pipeline's weights, so the adapter must give exactly what
``DiffusersBackend`` gives on that pipeline: same init vectors, conditioning, predictions and latents.
"""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from extension.a1111_backend import A1111Backend, family_of, training_session
from privdiff.embeddings.textual_inversion import PLACEHOLDER, TIConfig, diffusion_loss
from privdiff.errors import PrivdiffError
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.protocol import SDBackend

_spec = importlib.util.spec_from_file_location("a1111_standin", Path(__file__).with_name("a1111_standin.py"))
standin = sys.modules.setdefault("a1111_standin", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(standin)

PROMPTS = [f"a photo of {PLACEHOLDER}", f"a painting of {PLACEHOLDER}, in the style of a weird cat's toy",
           PLACEHOLDER]


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pair(request):
    """(A1111Backend over a stand-in, DiffusersBackend over an identical pipeline)."""
    pipe = request.getfixturevalue(f"tiny_{request.param}")
    ours = copy.deepcopy(pipe)
    return A1111Backend(standin.StandInModel(ours), resolution=32), DiffusersBackend(copy.deepcopy(pipe))


def _vectors(backend, b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, n, d, generator=g) for k, d in backend.encoder_dims.items()}


def test_properties_follow_the_model(pair):
    a1111, reference = pair
    assert isinstance(a1111, SDBackend)
    assert a1111.family == reference.family and a1111.encoder_dims == reference.encoder_dims
    assert a1111.prediction_type == "epsilon" and a1111.resolution == 32
    torch.testing.assert_close(a1111.alphas_cumprod, reference.alphas_cumprod)
    v = A1111Backend(standin.StandInModel(copy.deepcopy(reference.pipe), parameterization="v"))
    assert v.prediction_type == "v_prediction" and v.resolution == (1024 if v.family == "SDXL" else 512)


def test_token_vectors_and_conditioning_equal_diffusers(pair):
    a1111, reference = pair
    for word, n in [("style", 1), ("painting cat", 3)]:
        ours, theirs = a1111.token_vectors(word, n), reference.token_vectors(word, n)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key])
    vectors = _vectors(a1111, len(PROMPTS), 2)
    cond, expected = a1111.encode_prompts(PROMPTS, PLACEHOLDER, vectors, size=(32, 32)), \
        reference.encode_prompts(PROMPTS, PLACEHOLDER, vectors, size=(32, 32))
    torch.testing.assert_close(cond["crossattn"], expected["encoder_hidden_states"])
    if a1111.family == "SDXL":
        torch.testing.assert_close(cond["vector"], torch.cat([expected["text_embeds"], expected["time_ids"]], 1))
    plain, plain_expected = a1111.encode_text(["a cat", ""]), reference.encode_text(["a cat", ""])
    torch.testing.assert_close(plain["crossattn"], plain_expected["encoder_hidden_states"])


def test_predictions_latents_and_loss_equal_diffusers(pair):
    a1111, reference = pair
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    latents = a1111.encode_images(images, torch.Generator().manual_seed(3))
    torch.testing.assert_close(latents, reference.encode_images(images, torch.Generator().manual_seed(3)))
    torch.testing.assert_close(a1111.decode_latents(latents), reference.decode_latents(latents))
    t, noise = torch.tensor([10, 900]), torch.randn(latents.shape, generator=torch.Generator().manual_seed(4))
    vectors = _vectors(a1111, 2, 1)
    loss = diffusion_loss(a1111, latents, t, noise, PROMPTS[:2], vectors)
    torch.testing.assert_close(loss, diffusion_loss(reference, latents, t, noise, PROMPTS[:2], vectors))


def test_gradients_reach_the_vectors_only(pair):
    a1111, _ = pair
    model = a1111.sd_model
    with training_session(model, resolution=32) as backend:
        vectors = {k: v.requires_grad_(True) for k, v in _vectors(backend, 2, 2).items()}
        latents = torch.randn(2, 4, 8, 8)
        loss = diffusion_loss(backend, latents, torch.tensor([5, 500]), torch.randn_like(latents),
                              PROMPTS[:2], vectors).sum()
        loss.backward()
        assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in vectors.values())
        assert all(p.grad is None for p in model.parameters())


def test_session_restores_every_flag_and_leaves_no_hook(pair):
    a1111, _ = pair
    model = a1111.sd_model
    model.train()
    model.first_stage_model.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = {n: dict(m._forward_hooks) for n, m in model.named_modules()}
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([300])
    with torch.no_grad():
        before = a1111.predict_noise(latents, t, a1111.encode_text(["a cat"]))
    with pytest.raises(RuntimeError, match="interrupted"), training_session(model) as backend:
        assert not any(p.requires_grad for p in model.parameters()) and not model.training
        backend.encode_prompts(PROMPTS[:1], PLACEHOLDER, _vectors(backend, 1, 1))
        raise RuntimeError("interrupted")
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(m.training for m in model.modules())
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules()} == hooks
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(a1111.predict_noise(latents, t, a1111.encode_text(["a cat"])), before)


def test_dpagg_ti_trains_through_the_adapter(tiny_sd1):
    from privdiff.embeddings.dpagg import run_dpagg_ti
    from privdiff.release.dp_params import DPParams

    model = standin.StandInModel(copy.deepcopy(tiny_sd1))
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    params = DPParams(epsilon=8.0, delta=1e-3, sample_rate=1.0, clip_norm=1.0, bound="clip")
    with training_session(model, resolution=32) as backend:
        result = run_dpagg_ti(backend, images, params, TIConfig(steps=2, batch_size=2))
    assert result.embedding.vectors["clip_l"].shape == (1, 768) and result.report.private


def test_unsupported_models_are_refused(tiny_sd1):
    model = standin.StandInModel(copy.deepcopy(tiny_sd1))
    model.is_sd3 = True
    with pytest.raises(PrivdiffError, match="SD3"):
        family_of(model)
    model.is_sd3 = False
    model.model.diffusion_model.in_channels = 9
    with pytest.raises(PrivdiffError, match="9 channels"):
        A1111Backend(model)
    with pytest.raises(PrivdiffError, match="no A1111 text encoder"):
        family_of(torch.nn.Linear(1, 1))
