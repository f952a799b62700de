"""Offline loading of original-layout (CompVis/sgm) single-file SD1.x, SD2.x and SDXL checkpoints.

The family is detected from the checkpoint's keys, as ComfyUI and A1111 do; the diffusers configs are
written from the architectures' known hyper-parameters, with widths and depths read from tensor shapes
(so reduced-width checkpoints of the same layout load too); the CLIP tokenizers come from the BPE
vocabulary shipped in ``clip_vocab/`` (OpenAI CLIP, MIT). diffusers then converts the weights.
"""

from __future__ import annotations

import gzip
import json
import re
import tempfile
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from privdiff.errors import PrivdiffError
from privdiff.models.tiny import BOS, EOS, MAX_LENGTH, _byte_chars

_VOCAB_GZ = Path(__file__).with_name("clip_vocab") / "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 256 bytes x 2 (with and without </w>), merges, BOS, EOS
_UNET = "model.diffusion_model."
_SD1_CLIP = "cond_stage_model.transformer.text_model."
_SD1_CLIP_LEGACY = "cond_stage_model.transformer."  # some older trainers' files: no ``text_model.`` level
_SD2_CLIP = "cond_stage_model.model."
_XL_CLIP_L = "conditioner.embedders.0.transformer.text_model."
_XL_CLIP_G = "conditioner.embedders.1.model."
_V_PRED_PROBE = _UNET + "output_blocks.11.1.transformer_blocks.0.norm1.bias"
_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1}


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor in a .safetensors or .ckpt checkpoint (without loading .safetensors data)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def detect_family(keys: set[str] | dict) -> str:
    """"sd1", "sd2" or "sdxl" from a single-file checkpoint's keys; "" when it matches no known layout."""
    has = {p: any(k.startswith(p) for k in keys) for p in (_UNET, _SD1_CLIP, _SD2_CLIP, _XL_CLIP_L, _XL_CLIP_G)}
    if not has[_UNET] or "first_stage_model.encoder.conv_in.weight" not in keys:
        return ""
    if has[_XL_CLIP_L] and has[_XL_CLIP_G]:
        return "sdxl"
    if has[_SD2_CLIP]:
        return "sd2"
    return "sd1" if has[_SD1_CLIP] or _sd1_clip_prefix(keys) == _SD1_CLIP_LEGACY else ""


def _sd1_clip_prefix(keys: set[str] | dict) -> str:
    """Where an SD1 checkpoint keeps CLIP's text model: ``…transformer.text_model.``, or ``…transformer.`` (files
    from some older trainers, e.g. ``cond_stage_model.transformer.encoder.layers.0…``); "" for neither."""
    if _SD1_CLIP + "embeddings.token_embedding.weight" in keys:
        return _SD1_CLIP
    return _SD1_CLIP_LEGACY if _SD1_CLIP_LEGACY + "embeddings.token_embedding.weight" in keys else ""


def _count(shapes: dict, pattern: str) -> int:
    """Number of distinct integers matching ``(\\d+)`` in ``pattern`` over the keys."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _unet_config(shapes: dict, family: str) -> dict:
    """UNet2DConditionModel config: block widths, depths and projections read from the ldm UNet's shapes."""
    n_inputs = _count(shapes, re.escape(_UNET) + r"input_blocks\.(\d+)\.")
    levels: list[list[str]] = [[]]
    for n in range(1, n_inputs):  # res (+ transformer) blocks, a Downsample between levels
        p = f"{_UNET}input_blocks.{n}."
        if p + "0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(p)
    widths = [shapes[level[0] + "0.out_layers.3.weight"][0] for level in levels]
    attention = [level[0] + "1.proj_in.weight" in shapes for level in levels]
    depths = [_count(shapes, re.escape(level[0]) + r"1\.transformer_blocks\.(\d+)\.") for level in levels]
    context = next(v[1] for k, v in shapes.items() if k.startswith(_UNET) and k.endswith("attn2.to_k.weight"))
    linear = len(next(v for k, v in shapes.items() if k.startswith(_UNET) and k.endswith("proj_in.weight"))) == 2
    config = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128 if family == "sdxl" else 64,  # 1024 and 512 pixels; SD2 768-v is set by the caller
        "in_channels": shapes[_UNET + "input_blocks.0.0.weight"][1],
        "out_channels": shapes[_UNET + "out.2.weight"][0],
        "block_out_channels": widths,
        "layers_per_block": len(levels[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "cross_attention_dim": context,
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "use_linear_projection": linear,
        # SD1 has 8 heads everywhere; SD2 and SDXL have 64-channel heads (diffusers names heads attention_head_dim)
        "attention_head_dim": 8 if family == "sd1" else [max(w // 64, 1) for w in widths],
        "norm_num_groups": 32,
    }
    if "label_emb.0.0.weight" in {k[len(_UNET):] for k in shapes}:
        pooled = shapes[_XL_CLIP_G + "text_projection"][1]
        total = shapes[_UNET + "label_emb.0.0.weight"][1]
        config.update(addition_embed_type="text_time", addition_time_embed_dim=(total - pooled) // 6,
                      projection_class_embeddings_input_dim=total)
    return config


def _vae_config(shapes: dict, family: str) -> dict:
    """AutoencoderKL config from the ldm autoencoder's shapes."""
    p = "first_stage_model.encoder.down."
    levels = _count(shapes, re.escape(p) + r"(\d+)\.")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shapes["first_stage_model.encoder.conv_in.weight"][1],
        "out_channels": shapes["first_stage_model.decoder.conv_out.weight"][0],
        "latent_channels": shapes["first_stage_model.post_quant_conv.weight"][0],
        "block_out_channels": [shapes[f"{p}{i}.block.0.conv1.weight"][0] for i in range(levels)],
        "layers_per_block": _count(shapes, re.escape(p) + r"0\.block\.(\d+)\."),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "sample_size": 1024 if family == "sdxl" else 512,
        "scaling_factor": 0.13025 if family == "sdxl" else 0.18215,
    }


def _clip_config(shapes: dict, prefix: str, open_clip: bool, projection: bool = False) -> dict:
    """CLIPTextConfig for an OpenAI (transformers layout) or OpenCLIP text encoder, from its shapes."""
    if open_clip:
        width = shapes[prefix + "token_embedding.weight"][1]
        layers = _count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
        vocab, positions = shapes[prefix + "token_embedding.weight"][0], shapes[prefix + "positional_embedding"][0]
        inner = shapes[prefix + "transformer.resblocks.0.mlp.c_fc.weight"][0]
    else:
        width = shapes[prefix + "embeddings.token_embedding.weight"][1]
        layers = _count(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
        vocab = shapes[prefix + "embeddings.token_embedding.weight"][0]
        positions = shapes[prefix + "embeddings.position_embedding.weight"][0]
        inner = shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0]
    return {
        "architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": vocab, "hidden_size": width, "intermediate_size": inner,
        # SD2 uses OpenCLIP's penultimate layer: diffusers' SD2 text encoder has the last layer dropped
        "num_hidden_layers": layers - 1 if open_clip and not projection else layers,
        "num_attention_heads": max(width // 64, 1), "max_position_embeddings": positions,
        "hidden_act": "gelu" if open_clip else "quick_gelu",
        "projection_dim": shapes[prefix + "text_projection"][1] if projection else 768,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1 if open_clip else 49407,
    }


def write_clip_tokenizer(folder: Path, pad: str) -> None:
    """CLIP's BPE tokenizer files (vocab.json, merges.txt) from the shipped vocabulary."""
    folder.mkdir(parents=True)
    with gzip.open(_VOCAB_GZ, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:1 + _N_MERGES]
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": pad}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def _is_v_prediction(path: Path, shapes: dict, family: str) -> bool:
    """SD2 768-v detection: a ``v_pred`` key (ComfyUI), ``parameterization: "v"`` in a sibling .yaml (A1111),
    else the weight statistic ComfyUI and diffusers use (std of one norm bias above 0.09 for v models)."""
    if "v_pred" in shapes:
        return True
    yaml = path.with_suffix(".yaml")
    if yaml.is_file():
        return re.search(r"parameterization:\s*['\"]?v['\"]?\s*$", yaml.read_text(errors="replace"), re.M) is not None
    if family != "sd2" or _V_PRED_PROBE not in shapes:
        return False
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            bias = f.get_tensor(_V_PRED_PROBE)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        bias = state.get("state_dict", state)[_V_PRED_PROBE]
    return bias.float().std().item() > 0.09


def write_config_folder(path: Path, folder: Path) -> str:
    """Write the diffusers model folder (configs, tokenizers; no weights) for checkpoint ``path``; return its family."""
    shapes = read_shapes(path)
    family = detect_family(shapes)
    if not family:
        raise PrivdiffError(f"{path}: not an SD1.x, SD2.x or SDXL checkpoint in the original single-file layout "
                            "(expected model.diffusion_model, first_stage_model and text-encoder keys)")
    v = _is_v_prediction(path, shapes, family)
    scheduler = {"_class_name": "EulerDiscreteScheduler" if family == "sdxl" else "DDIMScheduler", **_SCHEDULE,
                 "prediction_type": "v_prediction" if v else "epsilon"}
    if family != "sdxl":
        scheduler.update(clip_sample=False, set_alpha_to_one=False)
    else:
        scheduler.update(timestep_spacing="leading")
    unet = _unet_config(shapes, family)
    if unet["in_channels"] != 4:
        raise PrivdiffError(f"{path}: a UNet with {unet['in_channels']} input channels (an inpainting or edit model) "
                            "is not supported; use a base SD1.x, SD2.x or SDXL checkpoint")
    vae = _vae_config(shapes, family)
    if family == "sd2" and v:  # SD2 768-v: 768-pixel training, attention in float32 (as its diffusers config)
        unet.update(sample_size=96, upcast_attention=True)
        vae["sample_size"] = 768
    configs = {"unet": unet, "vae": vae, "scheduler": scheduler}
    index = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", scheduler["_class_name"]],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}
    if family == "sdxl":
        configs["text_encoder"] = _clip_config(shapes, _XL_CLIP_L, open_clip=False)
        configs["text_encoder_2"] = _clip_config(shapes, _XL_CLIP_G, open_clip=True, projection=True)
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"],
                     _class_name="StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True)
        write_clip_tokenizer(folder / "tokenizer", EOS)
        write_clip_tokenizer(folder / "tokenizer_2", "!")
    else:
        sd2 = family == "sd2"
        configs["text_encoder"] = _clip_config(shapes, _SD2_CLIP if sd2 else _sd1_clip_prefix(shapes), open_clip=sd2)
        index.update(_class_name="StableDiffusionPipeline", safety_checker=[None, None],
                     feature_extractor=[None, None], requires_safety_checker=False)
        write_clip_tokenizer(folder / "tokenizer", "!" if sd2 else EOS)
    for name, config in configs.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        file = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / file).write_text(json.dumps(config), encoding="utf-8")
    (folder / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    return family


def _legacy_text_encoder(path: Path, config: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """The CLIPTextModel of an SD1 checkpoint whose CLIP keys lack the ``text_model.`` level."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(_SD1_CLIP_LEGACY)}  # noqa: SIM118
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        state = {k: v for k, v in state.get("state_dict", state).items() if k.startswith(_SD1_CLIP_LEGACY)}
    model = CLIPTextModel(CLIPTextConfig.from_pretrained(config))
    inner = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""  # transformers 4
    renamed = {inner + k[len(_SD1_CLIP_LEGACY):]: v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    wrong = [k for k in missing + unexpected if not k.endswith("position_ids")]
    if wrong:
        raise PrivdiffError(f"{path}: its CLIP text encoder does not match CLIP's layout ({len(wrong)} keys differ, "
                            f"e.g. {wrong[0]})")
    return model.to(dtype) if dtype is not None else model


def load_single_file(path: Path, dtype: torch.dtype | None, dtype_kw: str) -> DiffusionPipeline:
    """Load an original-layout checkpoint as a diffusers pipeline, offline; ``dtype_kw`` names from_single_file's
    dtype argument."""
    with tempfile.TemporaryDirectory(prefix="privdiff-config-") as tmp:
        family = write_config_folder(path, Path(tmp))
        cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        extra = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
        if family == "sd1" and _sd1_clip_prefix(read_shapes(path)) == _SD1_CLIP_LEGACY:  # diffusers expects text_model.
            extra["text_encoder"] = _legacy_text_encoder(path, Path(tmp) / "text_encoder", dtype)
        return cls.from_single_file(str(path), config=tmp, local_files_only=True, **{dtype_kw: dtype}, **extra)
