"""Writes the Hugging Face cache A1111 reads even for random weights (openai/clip-vit-large-patch14's tokenizer
and config), offline: the tokenizer from the CLIP vocabulary privdiff ships, the config from ViT-L/14's known
hyper-parameters. Usage: ``python tests/a1111_hf_cache.py HF_HOME`` (then run A1111 with that ``HF_HOME``).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from privdiff.models.single_file import write_clip_tokenizer
from privdiff.models.tiny import EOS

REPO = "openai/clip-vit-large-patch14"
REVISION = "0" * 40  # any name: HF_HUB_OFFLINE resolves refs/main to this snapshot
TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 768,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1}
VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
          "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "projection_dim": 768}


def write(hf_home: Path) -> Path:
    """The snapshot folder written under ``hf_home/hub``."""
    model = hf_home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = model / "snapshots" / REVISION
    if snapshot.exists():
        shutil.rmtree(snapshot)
    with tempfile.TemporaryDirectory() as tmp:
        write_clip_tokenizer(Path(tmp) / "tok", pad=EOS)
        shutil.copytree(Path(tmp) / "tok", snapshot)
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768,
              "text_config": TEXT, "vision_config": VISION}
    (snapshot / "config.json").write_text(json.dumps(config, indent=1))
    special = {"bos_token": "<|startoftext|>", "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (snapshot / "special_tokens_map.json").write_text(json.dumps(special))
    (model / "refs").mkdir(exist_ok=True)
    (model / "refs" / "main").write_text(REVISION)
    return snapshot


if __name__ == "__main__":
    print(write(Path(sys.argv[1])))
