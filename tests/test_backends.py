"""DiffusersBackend on tiny SD1/SDXL pipelines: injection equals diffusers' textual inversion, etc."""

import copy

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from privdiff.errors import PrivdiffError
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.protocol import SDBackend
from privdiff.models.registry import load_model
from privdiff.models.tiny import _WORDS, tiny_pipeline, tiny_tokenizer

PROMPTS = ["a photo of <ph>", "a painting of <ph>, in the style of a weird cat's toy", "<ph>"]
FAMILIES = ["sd1", "sdxl"]


@pytest.fixture(params=FAMILIES)
def family(request):
    """(pipeline, backend) for each tiny family."""
    name = request.param
    return request.getfixturevalue(f"tiny_{name}"), request.getfixturevalue(f"{name}_backend")


def _vectors(backend, b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, n, d, generator=g) for k, d in backend.encoder_dims.items()}


def test_tiny_tokenizer_has_whole_word_tokens():
    tok = tiny_tokenizer()
    assert all(len(tok(w, add_special_tokens=False).input_ids) == 1 for w in _WORDS)
    assert tok.model_max_length == 77 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tiny_tokenizer(pad_token="!").pad_token_id == 0


def test_backend_properties(family):
    pipe, backend = family
    assert isinstance(backend, SDBackend)
    assert backend.family == ("SDXL" if isinstance(pipe, StableDiffusionXLPipeline) else "SD1")
    xl = backend.family == "SDXL"
    assert backend.encoder_dims == ({"clip_l": 768, "clip_g": 1280} if xl else {"clip_l": 768})
    assert backend.prediction_type == "epsilon" and backend.resolution == 32
    expected = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    torch.testing.assert_close(backend.alphas_cumprod, expected)
    assert backend.alphas_cumprod.dtype == torch.float32 and (backend.alphas_cumprod.diff() < 0).all()


def test_injection_equals_diffusers_load_textual_inversion(family, tmp_path):
    """What we train on is what users get when diffusers loads the embedding file."""
    pipe, backend = family
    vectors = _vectors(backend, 1, 2)
    ref = copy.deepcopy(pipe)
    encoders = {"clip_l": (ref.text_encoder, ref.tokenizer)}
    if backend.family == "SDXL":
        encoders["clip_g"] = (ref.text_encoder_2, ref.tokenizer_2)
    for key, (text_encoder, tokenizer) in encoders.items():
        path = tmp_path / f"{key}.safetensors"
        save_file({"emb_params": vectors[key][0].contiguous()}, path)
        ref.load_textual_inversion(str(path), token="<x>", text_encoder=text_encoder, tokenizer=tokenizer)
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = ref.encode_prompt(prompt.replace("<ph>", "<x>"), device="cpu", num_images_per_prompt=1,
                                         do_classifier_free_guidance=False)
            cond = backend.encode_prompts([prompt], "<ph>", vectors)
        torch.testing.assert_close(cond["encoder_hidden_states"], expected[0], atol=1e-5, rtol=0)
        if backend.family == "SDXL":
            torch.testing.assert_close(cond["text_embeds"], expected[2], atol=1e-5, rtol=0)
            time_ids = ref._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, 1280)
            torch.testing.assert_close(cond["time_ids"], time_ids)
    assert len(pipe.tokenizer) < len(ref.tokenizer)  # the backend's own tokenizer was not touched


def test_batched_rows_equal_single_prompts(family):
    _, backend = family
    vectors = _vectors(backend, len(PROMPTS), 3)
    with torch.no_grad():
        batched = backend.encode_prompts(PROMPTS, "<ph>", vectors)
        for b, prompt in enumerate(PROMPTS):
            single = backend.encode_prompts([prompt], "<ph>", {k: v[b:b + 1] for k, v in vectors.items()})
            for key, value in single.items():
                torch.testing.assert_close(batched[key][b:b + 1], value, atol=1e-5, rtol=1e-5)


def test_pooled_output_at_eos_with_legacy_eos_config(sdxl_backend, tiny_sdxl):
    """Configs with eos_token_id 2 find EOS by argmax of the ids; the slots must not win it."""
    vectors = _vectors(sdxl_backend, 1, 2)
    with torch.no_grad():
        expected = sdxl_backend.encode_prompts(PROMPTS[:1], "<ph>", vectors)["text_embeds"]
        text_model = tiny_sdxl.text_encoder_2.text_model
        eos, text_model.eos_token_id = text_model.eos_token_id, 2
        try:
            legacy = sdxl_backend.encode_prompts(PROMPTS[:1], "<ph>", vectors)["text_embeds"]
        finally:
            text_model.eos_token_id = eos
    torch.testing.assert_close(legacy, expected)


def test_gradients_reach_only_the_vectors(family):
    pipe, backend = family
    vectors = {k: v.requires_grad_() for k, v in _vectors(backend, 2, 2).items()}
    cond = backend.encode_prompts(PROMPTS[:2], "<ph>", vectors)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    backend.predict_noise(latents, torch.tensor([10, 900]), cond).square().mean().backward()
    for v in vectors.values():
        assert v.grad is not None and (v.grad.flatten(1).norm(dim=1) > 0).all()
    assert all(p.grad is None and not p.requires_grad for p in pipe.unet.parameters())
    assert all(not p.requires_grad for p in pipe.text_encoder.parameters())
    assert not pipe.text_encoder.get_input_embeddings()._forward_hooks


def test_encode_decode_and_predict_noise_shapes(family):
    _, backend = family
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        z1 = backend.encode_images(images, generator=torch.Generator().manual_seed(0))
        z2 = backend.encode_images(images, generator=torch.Generator().manual_seed(0))
        decoded = backend.decode_latents(z1)
        cond = backend.encode_prompts(PROMPTS[:2], "<ph>", _vectors(backend, 2, 1))
        noise = backend.predict_noise(z1, torch.tensor([0, 999]), cond)
    assert z1.shape == (2, 4, 8, 8) and torch.equal(z1, z2)
    assert decoded.shape == (2, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1
    assert noise.shape == z1.shape and noise.dtype == backend.dtype


def test_token_vectors(family):
    pipe, backend = family
    vectors = backend.token_vectors("cat", 3)
    assert {k: v.shape for k, v in vectors.items()} == {k: (3, d) for k, d in backend.encoder_dims.items()}
    cat = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("cat</w>")]
    torch.testing.assert_close(vectors["clip_l"], cat.expand(3, -1))
    two = backend.token_vectors("weird cat", 4)["clip_l"]
    assert torch.equal(two[0], two[1]) and torch.equal(two[2], vectors["clip_l"][0])
    for word in ("", "  ", "<|endoftext|>"):
        with pytest.raises(PrivdiffError, match="initialisation word"):
            backend.token_vectors(word, 1)


def test_encode_prompts_rejects_bad_input(sd1_backend):
    vectors = _vectors(sd1_backend, 1, 2)
    for prompt in ("a photo of a cat", "<ph> and <ph>"):
        with pytest.raises(PrivdiffError, match="exactly once"):
            sd1_backend.encode_prompts([prompt], "<ph>", vectors)
    with pytest.raises(PrivdiffError, match="truncated"):
        sd1_backend.encode_prompts(["cat " * 74 + "<ph>"], "<ph>", vectors)
    sd1_backend.encode_prompts(["cat " * 73 + "<ph> " + "dog " * 10], "<ph>", vectors)  # tail is truncated
    with pytest.raises(PrivdiffError, match="do not match"):
        sd1_backend.encode_prompts(["<ph>", "<ph>"], "<ph>", vectors)
    with pytest.raises(PrivdiffError, match="clip_g"):
        sd1_backend.encode_prompts(["<ph>"], "<ph>", {**vectors, "clip_g": torch.zeros(1, 2, 1280)})


def test_load_model(tiny_sd1, tmp_path):
    assert isinstance(load_model("tiny"), StableDiffusionPipeline)
    with pytest.raises(PrivdiffError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(PrivdiffError, match="model_index.json"):
        load_model(tmp_path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(PrivdiffError, match="bad.safetensors"):
        load_model(tmp_path / "bad.safetensors")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(PrivdiffError, match="unsupported"):
        load_model(tmp_path / "model.txt")


def test_load_model_from_diffusers_folder(family, tmp_path):
    pipe, backend = family
    pipe.save_pretrained(tmp_path / "model")
    loaded = DiffusersBackend(load_model(tmp_path / "model", dtype=torch.float32))
    assert loaded.family == backend.family
    vectors = _vectors(backend, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_prompts(PROMPTS[:1], "<ph>", vectors),
                                   backend.encode_prompts(PROMPTS[:1], "<ph>", vectors))


def test_tiny_pipeline_is_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    a, b = tiny_pipeline("sd1", seed=1), tiny_pipeline("sd1", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters(), strict=True))
    with pytest.raises(PrivdiffError, match="sd3"):
        tiny_pipeline("sd3")


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_pipeline_generates(name, request):
    pipe = request.getfixturevalue(f"tiny_{name}")
    out = pipe("a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
