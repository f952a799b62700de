"""Tiny random-weight Stable Diffusion pipelines built from configs, and their local tokenizer.

Nothing here touches the network: the tokenizer is written locally (byte-level CLIP BPE whose
merges make every prompt-template word a single token), and the models are built from configs.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import deprecation_utils
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from privdiff.errors import PrivdiffError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
TINY_RESOLUTION = 32

_WORDS = (
    # textual-inversion prompt templates
    "a", "an", "the", "of", "in", "on", "at", "by", "with", "and", "one", "my", "this", "that", "is",
    "photo", "rendering", "rendition", "cropped", "close", "up", "bright", "good", "clean", "weird", "cool",
    "nice", "small", "large", "big", "dark", "light", "painting", "picture", "art", "style",
    # common subjects and styles
    "cat", "dog", "person", "man", "woman", "face", "portrait", "landscape", "sketch", "drawing", "image",
    "object", "toy", "sculpture", "car", "house", "tree", "flower", "sky", "city", "street", "abstract",
    "oil", "watercolor", "pencil", "digital", "illustration", "anime", "cartoon", "texture", "pattern",
    "sunset", "mountain", "beach", "forest", "water", "red", "blue", "green", "white", "black", "high",
    "quality", "detailed",
)

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (deprecating the old name) in 2026.
DTYPE_KW = "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"

_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "prediction_type": "epsilon"}


def _byte_chars() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: one printable character per byte, in CLIP's vocab order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply BPE merges by rank (lowest first) to a word's symbols."""
    while len(symbols) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(zip(symbols, symbols[1:], strict=False))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _vocab_and_merges(words: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """Byte characters, their ``</w>`` forms, one whole-word token per word in ``words``, BOS, EOS."""
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Merges are appended with the worst rank, so they never change how earlier words split.
        while len(parts := _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)) > 1:
            ranks[(parts[0], parts[1])] = len(ranks)
            tokens.append(parts[0] + parts[1])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, [f"{a} {b}" for a, b in ranks]


def tiny_tokenizer_dir(path: str | Path, pad_token: str = EOS, extra_words: tuple[str, ...] = ()) -> Path:
    """Write a tiny CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) into ``path``.

    ``extra_words`` become whole-word tokens too, after the built-in ones (whose ids they leave unchanged).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges(_WORDS + tuple(w for w in extra_words if w not in _WORDS))
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "bos_token": BOS,
              "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return path


def tiny_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """The tiny CLIP tokenizer; SD1 and SDXL's first tokenizer pad with EOS, SDXL's second with "!"."""
    with tempfile.TemporaryDirectory(prefix="privdiff-tok-") as tmp:
        return CLIPTokenizer.from_pretrained(tiny_tokenizer_dir(tmp, pad_token), local_files_only=True)


def _text_config(tokenizer: CLIPTokenizer, hidden: int, act: str, projection: int = 768) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, hidden_act=act, projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _vae(scaling_factor: float) -> AutoencoderKL:
    """32x32 RGB <-> 4x8x8 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=32, sample_size=TINY_RESOLUTION, scaling_factor=scaling_factor,
    )


def _unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=(2, 4), norm_num_groups=32, **extra,
    )


def tiny_pipeline(family: str = "sd1", seed: int = 0) -> DiffusionPipeline:
    """A random-weight SD1-like ("sd1") or SDXL-like ("sdxl") pipeline for 32x32 images."""
    if family not in ("sd1", "sdxl"):
        raise PrivdiffError(f"unknown tiny model family {family!r} (expected 'sd1' or 'sdxl')")
    with torch.random.fork_rng(devices=[]):  # seeds weight init only; the global RNG is left as it was
        torch.manual_seed(seed)
        return _build(family)


def _build(family: str) -> DiffusionPipeline:
    tokenizer = tiny_tokenizer()
    if family == "sd1":
        return StableDiffusionPipeline(
            vae=_vae(0.18215),
            text_encoder=CLIPTextModel(_text_config(tokenizer, 768, "quick_gelu")),
            tokenizer=tokenizer,
            unet=_unet(768),
            scheduler=DDIMScheduler(**_SCHEDULE, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    tokenizer_2 = tiny_tokenizer(pad_token="!")
    return StableDiffusionXLPipeline(
        vae=_vae(0.13025),
        text_encoder=CLIPTextModel(_text_config(tokenizer, 768, "quick_gelu")),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, 1280, "gelu", projection=1280)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=_unet(2048, use_linear_projection=True, addition_embed_type="text_time",
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 1280),
        scheduler=EulerDiscreteScheduler(**_SCHEDULE, timestep_spacing="leading"),
        add_watermarker=False,
    )
