"""Files we write load with diffusers' load_textual_inversion and drive a (tiny) pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from privdiff.embeddings.files import Embedding, save_embedding
from privdiff.models.tiny import tiny_pipeline

TOKEN = "<privdiff-concept>"


def _vectors(n: int, widths: dict[str, int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: torch.randn(n, w, generator=g) * 0.01 for k, w in widths.items()}


def _token_rows(tokenizer, text_encoder, n: int) -> torch.Tensor:
    """The embedding rows diffusers added for TOKEN (multi-vector: TOKEN, TOKEN_1, ...)."""
    names = [TOKEN] + [f"{TOKEN}_{i}" for i in range(1, n)]
    ids = tokenizer.convert_tokens_to_ids(names)
    return text_encoder.get_input_embeddings().weight[ids].detach()


def _generate(pipe) -> np.ndarray:
    out = pipe(f"a photo of {TOKEN}", num_inference_steps=2, guidance_scale=1.0, output_type="np",
               generator=torch.Generator().manual_seed(0))
    return out.images


@pytest.mark.parametrize(("fmt", "name"), [
    ("safetensors", "concept.safetensors"),
    ("a1111-pt", "concept.pt"),
    ("diffusers", "concept.safetensors"),
])
def test_sd1_files_load_in_diffusers(tmp_path, fmt, name):
    vectors = _vectors(2, {"clip_l": 768})
    path = save_embedding(Embedding(vectors), tmp_path / name, fmt=fmt, token=TOKEN)
    pipe = tiny_pipeline("sd1")
    pipe.load_textual_inversion(str(path), token=TOKEN)
    rows = _token_rows(pipe.tokenizer, pipe.text_encoder, 2)
    assert torch.allclose(rows, vectors["clip_l"].to(rows.dtype))
    images = _generate(pipe)
    assert images.shape[0] == 1 and np.isfinite(images).all()


def test_diffusers_format_carries_its_token(tmp_path):
    vectors = _vectors(1, {"clip_l": 768})
    path = save_embedding(Embedding(vectors), tmp_path / "c.safetensors", fmt="diffusers", token=TOKEN)
    pipe = tiny_pipeline("sd1")
    pipe.load_textual_inversion(str(path))  # no token=: diffusers reads it from the file
    assert torch.allclose(_token_rows(pipe.tokenizer, pipe.text_encoder, 1), vectors["clip_l"])


def test_sdxl_file_loads_with_two_calls(tmp_path):
    vectors = _vectors(2, {"clip_l": 768, "clip_g": 1280})
    path = save_embedding(Embedding(vectors), tmp_path / "xl.safetensors")
    state = load_file(path)
    pipe = tiny_pipeline("sdxl")
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    assert torch.allclose(_token_rows(pipe.tokenizer, pipe.text_encoder, 2), vectors["clip_l"])
    assert torch.allclose(_token_rows(pipe.tokenizer_2, pipe.text_encoder_2, 2), vectors["clip_g"])
    images = _generate(pipe)
    assert images.shape[0] == 1 and np.isfinite(images).all()
