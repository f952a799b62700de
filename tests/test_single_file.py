"""Original-layout single-file SD1.x, SD2.x and SDXL checkpoints load offline, with no other file and no HF cache."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from privdiff.errors import PrivdiffError
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.registry import load_model
from privdiff.models.single_file import write_config_folder

_spec = importlib.util.spec_from_file_location("privdiff_single_file_checkpoints",
                                               Path(__file__).with_name("single_file_checkpoints.py"))
ckpts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ckpts)

UNET = "model.diffusion_model."
# (family, v_pred marker) -> (backend family, prediction type, text-encoder prefix in the checkpoint)
CASES = {
    ("sd1", False): ("SD1", "epsilon", "cond_stage_model.transformer.text_model."),
    ("sd2", False): ("SD2", "epsilon", "cond_stage_model.model."),
    ("sd2", True): ("SD2", "v_prediction", "cond_stage_model.model."),
    ("sdxl", False): ("SDXL", "epsilon", "conditioner.embedders.0.transformer.text_model."),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {key: ckpts.write_checkpoint(root / f"{key[0]}{'-v' if key[1] else ''}.safetensors", key[0], v_pred=key[1])
            for key in CASES}


@pytest.mark.parametrize("key", list(CASES), ids=lambda k: f"{k[0]}{'-v' if k[1] else ''}")
def test_single_file_loads_offline_with_its_weights(checkpoints, key):
    family, prediction, clip = CASES[key]
    path = checkpoints[key]
    state = load_file(str(path))
    backend = DiffusersBackend(load_model(path, dtype=torch.float32))
    pipe = backend.pipe
    assert (backend.family, backend.prediction_type) == (family, prediction)
    assert backend.resolution == {"SD1": 512, "SD2": 768 if prediction == "v_prediction" else 512, "SDXL": 1024}[family]
    assert torch.equal(pipe.unet.conv_in.weight, state[UNET + "input_blocks.0.0.weight"].float())
    assert torch.equal(pipe.vae.encoder.conv_in.weight, state["first_stage_model.encoder.conv_in.weight"].float())
    token_key = "token_embedding.weight" if family == "SD2" else "embeddings.token_embedding.weight"
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, state[clip + token_key].float())
    # CLIP's own BPE vocabulary: "a photo of a cat" is BOS 320 1125 539 320 2368 EOS in every SD tokenizer
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer.pad_token == ("!" if family == "SD2" else "<|endoftext|>")
    if family == "SDXL":
        g = "conditioner.embedders.1.model."
        assert pipe.tokenizer_2.pad_token == "!"
        assert torch.equal(pipe.text_encoder_2.text_projection.weight, state[g + "text_projection"].float().T)
        assert torch.equal(pipe.unet.add_embedding.linear_1.weight, state[UNET + "label_emb.0.0.weight"].float())
        assert pipe.unet.config.transformer_layers_per_block == [1, 2]
    vectors = {k: torch.zeros(1, 1, d) for k, d in backend.encoder_dims.items()}
    cond = backend.encode_prompts(["a photo of <ph>"], "<ph>", vectors)
    latents = torch.zeros(1, 4, 8, 8)
    with torch.no_grad():
        out = backend.predict_noise(latents, torch.tensor([10]), cond)
    assert out.shape == latents.shape and torch.isfinite(out).all()


def test_v_prediction_from_a1111_yaml(checkpoints, tmp_path):
    path = tmp_path / "sd2.safetensors"
    path.symlink_to(checkpoints[("sd2", False)])
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert load_model(path).scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd1_clip_keys_without_text_model_level_load(checkpoints, tmp_path, suffix):
    """Older trainers wrote SD1 CLIP keys as cond_stage_model.transformer.encoder… (no text_model.)."""
    clip, legacy = "cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."
    state = {k.replace(clip, legacy): v for k, v in load_file(str(checkpoints[("sd1", False)])).items()}
    assert legacy + "encoder.layers.0.mlp.fc1.weight" in state and not any(k.startswith(clip) for k in state)
    path = tmp_path / f"old{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    backend = DiffusersBackend(load_model(path, dtype=torch.float32))
    assert backend.family == "SD1"
    for name, tensor in backend.pipe.text_encoder.state_dict().items():
        if not name.endswith("position_ids"):
            assert torch.equal(tensor, state[legacy + name.removeprefix("text_model.")].float()), name
    cond = backend.encode_prompts(["a photo of <ph>"], "<ph>", {k: torch.zeros(1, 1, d)
                                                               for k, d in backend.encoder_dims.items()})
    with torch.no_grad():
        assert torch.isfinite(backend.predict_noise(torch.zeros(1, 4, 8, 8), torch.tensor([10]), cond)).all()


@pytest.mark.parametrize("std, prediction", [(0.2, "v_prediction"), (0.01, "epsilon")])
def test_sd2_v_prediction_from_the_weight_statistic(checkpoints, tmp_path, std, prediction):
    """No v_pred key and no .yaml: an SD2 file is 768-v when one norm bias has std above 0.09 (as ComfyUI)."""
    probe = UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state = load_file(str(checkpoints[("sd2", False)]))
    assert "v_pred" not in state
    # the reduced-width UNet has fewer output blocks: the probe is added (the configs are read from shapes)
    state[probe] = (torch.randn(320, generator=torch.Generator().manual_seed(0)) * std).half()
    save_file(state, str(tmp_path / "sd2.safetensors"))
    write_config_folder(tmp_path / "sd2.safetensors", tmp_path / "config")
    scheduler = json.loads((tmp_path / "config" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == prediction
    assert json.loads((tmp_path / "config" / "unet" / "config.json").read_text())["sample_size"] == (
        96 if prediction == "v_prediction" else 64)


def test_ckpt_with_state_dict_wrapper(checkpoints, tmp_path):
    path = tmp_path / "sd1.ckpt"
    torch.save({"state_dict": load_file(str(checkpoints[("sd1", False)]))}, path)
    assert DiffusersBackend(load_model(path)).family == "SD1"


def test_inpainting_unet_refused_in_one_line(checkpoints, tmp_path):
    state = load_file(str(checkpoints[("sd1", False)]))
    state[UNET + "input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3, dtype=torch.float16)
    save_file(state, str(tmp_path / "inpaint.safetensors"))
    with pytest.raises(PrivdiffError, match="inpaint.safetensors: a UNet with 9 input channels"):
        load_model(tmp_path / "inpaint.safetensors")


def test_unknown_layout_refused_in_one_line(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.ones(())}, str(path))
    with pytest.raises(PrivdiffError, match="lora.safetensors: not an SD1.x, SD2.x or SDXL checkpoint") as err:
        load_model(path)
    assert "\n" not in str(err.value)
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(PrivdiffError, match="cannot load .*bad.safetensors offline") as err:
        load_model(tmp_path / "bad.safetensors")
    assert "\n" not in str(err.value)


def test_cli_trains_on_a_single_file_checkpoint_with_an_empty_hf_cache(checkpoints, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-m", "privdiff.cli", "ti-aggregate", "--model", str(checkpoints[("sd1", False)]),
         "--images", str(images), "--out", str(out), "--epsilon", "2", "--delta", "1e-3", "--steps", "1",
         "--resolution", "64", "--device", "cpu"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert load_file(str(out))["emb_params"].shape[-1] == 768


def test_full_size_sd15_configs_match_the_known_architecture():
    from privdiff.models import single_file

    shapes = ckpts.checkpoint_shapes("sd15-full")
    assert single_file.detect_family(shapes) == "sd1"
    unet = single_file._unet_config(shapes, "sd1")
    assert {k: unet[k] for k in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                                 "cross_attention_dim", "attention_head_dim", "use_linear_projection",
                                 "sample_size")} == {
        "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 768, "attention_head_dim": 8, "use_linear_projection": False, "sample_size": 64}
    vae = single_file._vae_config(shapes, "sd1")
    assert (vae["block_out_channels"], vae["layers_per_block"], vae["latent_channels"]) == ([128, 256, 512, 512], 2, 4)
    clip = single_file._clip_config(shapes, "cond_stage_model.transformer.text_model.", open_clip=False)
    assert (clip["num_hidden_layers"], clip["hidden_size"], clip["intermediate_size"], clip["num_attention_heads"],
            clip["hidden_act"]) == (12, 768, 3072, 12, "quick_gelu")


# With the integration tests (or on request): it writes 2 GB and takes about half a minute.
FULL_SIZE = any(os.environ.get(v) for v in ("PRIVDIFF_FULL_SIZE", "COMFYUI_PATH", "A1111_PATH"))


@pytest.mark.skipif(not FULL_SIZE, reason="set PRIVDIFF_FULL_SIZE=1 (or an integration path)")
def test_full_size_sd15_checkpoint_loads_offline(tmp_path):
    path = ckpts.write_checkpoint(tmp_path / "sd15.safetensors", "sd15-full")
    backend = DiffusersBackend(load_model(path, dtype=torch.float16))
    assert backend.family == "SD1" and backend.resolution == 512
    state = load_file(str(path))
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    assert torch.equal(backend.pipe.unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2.to_k.weight, state[key])
