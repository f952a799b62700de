"""The shipped ComfyUI workflows are consistent (no ComfyUI needed).

Every UI-format workflow in workflows/ has an API-format twin in workflows/api/ (and vice versa);
they use only core ComfyUI nodes and ours; UI links are consistent; and the UI file, read the way
the ComfyUI frontend reads it (widgets_values in declared input order), gives back its API twin.
The node tables below follow the node contract; tests/test_comfyui_integration.py checks them
against a running ComfyUI's /object_info.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
API = WORKFLOWS / "api"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
TITLE_HEIGHT = 30  # LiteGraph draws the title bar above a node's pos

# Inputs in declared order (required, then optional) and output types, per node type.
_RELEASE_HEAD = [("epsilon", "FLOAT"), ("delta", "FLOAT")]
_RELEASE_TAIL = [("sample_rate", "FLOAT"), ("clip_norm", "FLOAT"), ("bound", "COMBO")]
_RELEASE_OPTIONAL = [("new_release", "BOOLEAN"), ("public_size", "INT"), ("ledger_path", "STRING"),
                     ("budget_epsilon", "FLOAT"), ("change_budget", "BOOLEAN"), ("force_budget", "BOOLEAN"),
                     ("dataset_label", "STRING"), ("reproducible_seed", "INT")]
_RELEASE_OUTPUTS = ["STRING", "STRING", "STRING"]
_AUDIT = [("canaries", "INT"), ("confidence", "FLOAT")]
_AUDIT_OPTIONAL = [("public_size", "INT"), ("dataset_label", "STRING"), ("reproducible_seed", "INT")]

OUR_NODES: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]] = {
    # node type: (required inputs, optional inputs, output types)
    "PrivdiffLoadPrivateImages": ([("folder", "STRING"), ("resolution", "INT")], [], ["PRIVDIFF_DATASET"]),
    "PrivdiffDPTextualInversion": (
        [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("dataset", "PRIVDIFF_DATASET"),
         ("name", "STRING"), ("method", "COMBO"), *_RELEASE_HEAD, *_RELEASE_TAIL,
         ("vectors", "INT"), ("init_word", "STRING"), ("templates", "COMBO"), ("steps", "INT"),
         ("learning_rate", "FLOAT"), ("batch_size", "INT"), ("prompt_template", "STRING"), ("overwrite", "BOOLEAN")],
        _RELEASE_OPTIONAL,
        _RELEASE_OUTPUTS,
    ),
    "PrivdiffDPAggregateEmbeddings": (
        [("folder", "STRING"), ("one_image_per_file", "BOOLEAN"), ("name", "STRING"), *_RELEASE_HEAD,
         ("noise_multiplier", "FLOAT"), *_RELEASE_TAIL, ("prompt_template", "STRING"), ("overwrite", "BOOLEAN")],
        [("center", "STRING"), ("images_folder", "STRING"), *_RELEASE_OPTIONAL],
        _RELEASE_OUTPUTS,
    ),
    "PrivdiffDPLoRA": (
        [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("dataset", "PRIVDIFF_DATASET"), ("name", "STRING"),
         *_RELEASE_HEAD, ("sample_rate", "FLOAT"), ("clip_norm", "FLOAT"), ("rank", "INT"), ("alpha", "FLOAT"),
         ("targets", "COMBO"), ("steps", "INT"), ("learning_rate", "FLOAT"), ("batch_size", "INT"),
         ("prompt", "STRING"), ("overwrite", "BOOLEAN")],
        [item for item in _RELEASE_OPTIONAL if item[0] != "public_size"],
        ["STRING", "STRING"],
    ),
    "PrivdiffPrivacyReport": ([("embedding", "COMBO")], [], ["STRING"]),
    "PrivdiffDPStyleTarget": (
        [("dataset", "PRIVDIFF_DATASET"), ("clip_vision", "CLIP_VISION"), ("name", "STRING"), *_RELEASE_HEAD,
         ("sample_rate", "FLOAT"), ("overwrite", "BOOLEAN")],
        _RELEASE_OPTIONAL,
        ["STRING", "STRING"],
    ),
    "PrivdiffGuidedSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
         ("clip_vision", "CLIP_VISION"), ("target", "STRING"), ("latent_image", "LATENT"), ("seed", "INT"),
         ("steps", "INT"), ("cfg", "FLOAT"), ("guidance_weight", "FLOAT"), ("recurrence", "INT")],
        [],
        ["LATENT"],
    ),
    "PrivdiffSpectralFinetune": (
        [("prior", "COMBO"), ("folder", "STRING"), ("name", "STRING"), *_RELEASE_HEAD, ("sample_rate", "FLOAT"),
         ("clip_norm", "FLOAT"), ("steps", "INT"), ("learning_rate", "FLOAT"), ("overwrite", "BOOLEAN")],
        [item for item in _RELEASE_OPTIONAL if item[0] != "public_size"],
        ["STRING", "STRING"],
    ),
    "PrivdiffSpectralSample": (
        [("prior", "COMBO"), ("num_images", "INT"), ("seed", "INT"), ("temperature", "FLOAT")], [], ["IMAGE"],
    ),
    "PrivdiffStyleGuider": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("cfg", "FLOAT"),
         ("vae", "VAE"), ("clip_vision", "CLIP_VISION"), ("target", "STRING"), ("guidance_weight", "FLOAT")],
        [],
        ["GUIDER"],
    ),
    "PrivdiffAuditTextualInversion": (
        [("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("dataset", "PRIVDIFF_DATASET"), ("method", "COMBO"),
         *_RELEASE_HEAD, *_RELEASE_TAIL, ("vectors", "INT"), ("init_word", "STRING"), ("templates", "COMBO"),
         ("steps", "INT"), ("learning_rate", "FLOAT"), ("batch_size", "INT"), *_AUDIT],
        _AUDIT_OPTIONAL,
        ["STRING"],
    ),
    "PrivdiffAuditAggregateEmbeddings": (
        [("folder", "STRING"), ("one_image_per_file", "BOOLEAN"), *_RELEASE_HEAD, ("noise_multiplier", "FLOAT"),
         *_RELEASE_TAIL, *_AUDIT],
        [("center", "STRING"), *_AUDIT_OPTIONAL],
        ["STRING"],
    ),
    "PrivdiffAuditStyleTarget": (
        [("dataset", "PRIVDIFF_DATASET"), ("clip_vision", "CLIP_VISION"), *_RELEASE_HEAD, ("sample_rate", "FLOAT"),
         *_AUDIT],
        _AUDIT_OPTIONAL,
        ["STRING"],
    ),
    "PrivdiffAuditSpectralFinetune": (
        [("prior", "COMBO"), ("folder", "STRING"), *_RELEASE_HEAD, ("sample_rate", "FLOAT"), ("clip_norm", "FLOAT"),
         ("steps", "INT"), ("learning_rate", "FLOAT"), *_AUDIT],
        [item for item in _AUDIT_OPTIONAL if item[0] != "public_size"],
        ["STRING"],
    ),
    "PrivdiffEncryptedSampler": (
        [("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
         ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("denoise", "FLOAT"), ("threshold", "FLOAT"), ("packing", "COMBO"),
         ("channels", "COMBO"), ("encrypt_offsets", "BOOLEAN"), ("worker", "STRING")],
        [("noise", "COMBO")],
        ["LATENT", "STRING"],
    ),
}

CORE_NODES: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]], list[str]]] = {
    "CheckpointLoaderSimple": ([("ckpt_name", "COMBO")], [], ["MODEL", "CLIP", "VAE"]),
    "CLIPTextEncode": ([("text", "STRING"), ("clip", "CLIP")], [], ["CONDITIONING"]),
    "LoraLoader": (
        [("model", "MODEL"), ("clip", "CLIP"), ("lora_name", "COMBO"), ("strength_model", "FLOAT"),
         ("strength_clip", "FLOAT")],
        [],
        ["MODEL", "CLIP"],
    ),
    "CLIPVisionLoader": ([("clip_name", "COMBO")], [], ["CLIP_VISION"]),
    "EmptyLatentImage": ([("width", "INT"), ("height", "INT"), ("batch_size", "INT")], [], ["LATENT"]),
    "KSampler": (
        [("model", "MODEL"), ("seed", "INT"), ("steps", "INT"), ("cfg", "FLOAT"), ("sampler_name", "COMBO"),
         ("scheduler", "COMBO"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
         ("latent_image", "LATENT"), ("denoise", "FLOAT")],
        [],
        ["LATENT"],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], ["IMAGE"]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [], ["LATENT"]),
    "ImageScale": (
        [("image", "IMAGE"), ("upscale_method", "COMBO"), ("width", "INT"), ("height", "INT"), ("crop", "COMBO")],
        [],
        ["IMAGE"],
    ),
    "UpscaleModelLoader": ([("model_name", "COMBO")], [], ["UPSCALE_MODEL"]),
    "ImageUpscaleWithModel": ([("upscale_model", "UPSCALE_MODEL"), ("image", "IMAGE")], [], ["IMAGE"]),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "STRING")], [], []),
    "PreviewAny": ([("source", "*")], [], []),
}
NODES = {**CORE_NODES, **OUR_NODES}
# Widgets the frontend follows with a "control after generate" value (fixed/increment/...).
CONTROL_WIDGETS = {("KSampler", "seed"), ("PrivdiffGuidedSampler", "seed"), ("PrivdiffSpectralSample", "seed"),
                   ("PrivdiffEncryptedSampler", "seed")}

UI_FILES = sorted(WORKFLOWS.glob("*.json"))
API_FILES = sorted(API.glob("*.json"))


def _inputs(node_type: str) -> list[tuple[str, str]]:
    required, optional, _ = NODES[node_type]
    return required + optional


def _is_link(value: object) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def ui_to_api(ui: dict) -> dict:
    """The API prompt the frontend builds from ``ui`` (graphToPrompt), for the node types above."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        by_name = {i["name"]: i for i in node.get("inputs", [])}
        values = list(node.get("widgets_values", []))
        pos, inputs = 0, {}
        for name, typ in _inputs(node["type"]):
            linked = by_name.get(name, {}).get("link")
            if typ in WIDGET_TYPES:
                assert pos < len(values), f"node {node['id']} ({node['type']}): no widget value for {name}"
                value = values[pos]
                pos += 1 + ((node["type"], name) in CONTROL_WIDGETS)
                inputs[name] = value
            if linked is not None:
                _, src, slot, *_ = links[linked]
                inputs[name] = [str(src), slot]
        assert pos == len(values), f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {pos}"
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def test_every_workflow_has_its_twin():
    assert UI_FILES, "no workflows in workflows/"
    assert {p.name for p in UI_FILES} == {p.name for p in API_FILES}


@pytest.mark.parametrize("path", API_FILES, ids=lambda p: p.name)
def test_api_workflow(path: Path):
    prompt = _load(path)
    for nid, node in prompt.items():
        typ = node["class_type"]
        assert typ in NODES, f"{path.name}: node {nid} uses {typ}, neither a core node we expect nor ours"
        required, optional, _ = NODES[typ]
        names = {n for n, _ in required + optional}
        assert set(node["inputs"]) <= names, f"{path.name}: node {nid} has unknown inputs"
        missing = {n for n, _ in required} - set(node["inputs"])
        assert not missing, f"{path.name}: node {nid} ({typ}) lacks {sorted(missing)}"
        for name, value in node["inputs"].items():
            want = dict(required + optional)[name]
            if not _is_link(value):
                assert want in WIDGET_TYPES, f"{path.name}: node {nid}.{name} ({want}) must be linked"
                continue
            src = prompt[value[0]]
            out_types = NODES[src["class_type"]][2]
            assert value[1] < len(out_types), f"{path.name}: node {nid}.{name} links a missing output"
            assert want in (out_types[value[1]], "*"), f"{path.name}: node {nid}.{name} gets {out_types[value[1]]}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_links(path: Path):
    ui = _load(path)
    assert ui["version"] == 0.4
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]), "duplicate node ids"
    assert ui["last_node_id"] >= max(nodes)
    ids = [link[0] for link in ui["links"]]
    assert len(set(ids)) == len(ids), "duplicate link ids"
    assert ui["last_link_id"] >= max(ids, default=0)
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        out = nodes[src]["outputs"][src_slot]
        assert lid in out["links"] and out["type"] == typ == NODES[nodes[src]["type"]][2][src_slot]
        assert out.get("slot_index", src_slot) == src_slot
        inp = nodes[dst]["inputs"][dst_slot]
        assert inp["link"] == lid and inp["type"] in (typ, "*"), f"link {lid} into node {dst}"
    link_ids = set(ids)
    for node in ui["nodes"]:
        assert node["type"] in NODES, f"node {node['id']} uses {node['type']}"
        declared = dict(_inputs(node["type"]))
        for inp in node.get("inputs", []):
            assert declared.get(inp["name"]) == inp["type"], f"node {node['id']} input {inp['name']}"
            assert inp["link"] is None or inp["link"] in link_ids
            if inp["type"] in WIDGET_TYPES:
                assert inp.get("widget") == {"name": inp["name"]}
        outputs = node.get("outputs", [])
        assert [o["type"] for o in outputs] == NODES[node["type"]][2], f"node {node['id']} outputs"
        for o in outputs:
            assert set(o["links"] or []) <= link_ids


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_workflow_matches_api_twin(path: Path):
    got, want = ui_to_api(_load(path)), _load(API / path.name)
    assert set(got) == set(want)
    for nid, node in want.items():
        assert got[nid]["class_type"] == node["class_type"]
        assert set(got[nid]["inputs"]) == set(node["inputs"]), f"node {nid}"
        for name, value in node["inputs"].items():
            assert _same(got[nid]["inputs"][name], value), f"node {nid} ({node['class_type']}).{name}"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.name)
def test_ui_nodes_do_not_overlap(path: Path):
    boxes = [(n["id"], n["pos"][0], n["pos"][1] - TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in _load(path)["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = a[3] <= b[1] or b[3] <= a[1] or a[4] <= b[2] or b[4] <= a[2]
            assert apart, f"nodes {a[0]} and {b[0]} overlap"


def test_user_facing_defaults():
    for path in API_FILES:
        for node in _load(path).values():
            inputs = node["inputs"]
            if node["class_type"] == "CheckpointLoaderSimple":
                assert inputs["ckpt_name"] == "v1-5-pruned-emaonly.safetensors"
            if node["class_type"] == "PrivdiffLoadPrivateImages":
                assert inputs["folder"] == "private_images"
            if node["class_type"] in ("PrivdiffDPTextualInversion", "PrivdiffDPLoRA"):
                assert inputs["steps"] == 200
            if node["class_type"] == "LoraLoader":
                assert inputs["lora_name"] == "my_dp_lora.safetensors"  # what DP LoRA writes by default
            if node["class_type"] == "PrivdiffSpectralSample":
                assert inputs["prior"] == "my_dp_prior.safetensors"  # what DP Spectral Fine-tune writes by default
            if "epsilon" in inputs and node["class_type"].startswith("Privdiff"):
                assert 0 < inputs["epsilon"] <= 10 and 0 < inputs["delta"] <= 1e-4
                assert inputs.get("reproducible_seed", -1) == -1, "shipped workflows must use secure randomness"


def test_shipped_aggregate_workflow_runs_as_shipped():
    """Its DP node confirms one file per image and names the images' folder that the ledger charges."""
    prompt = json.loads((API / "dp_aggregate_embeddings.json").read_text())
    (node,) = [n for n in prompt.values() if n["class_type"] == "PrivdiffDPAggregateEmbeddings"]
    assert node["inputs"]["one_image_per_file"] is True and node["inputs"]["images_folder"]


def test_spectral_workflow_upsamples_both_ways():
    """Coarse samples go through a public upscaler, and through an SD img2img pass that keeps their layout."""
    prompt = json.loads((API / "spectral_dp.json").read_text())
    (sample,) = [nid for nid, n in prompt.items() if n["class_type"] == "PrivdiffSpectralSample"]
    (upscale,) = [n for n in prompt.values() if n["class_type"] == "ImageUpscaleWithModel"]
    assert upscale["inputs"]["image"] == [sample, 0]
    (encode,) = [nid for nid, n in prompt.items() if n["class_type"] == "VAEEncode"]
    (ksampler,) = [n for n in prompt.values() if n["class_type"] == "KSampler"]
    assert ksampler["inputs"]["latent_image"] == [encode, 0] and 0 < ksampler["inputs"]["denoise"] < 1
    assert len([n for n in prompt.values() if n["class_type"] == "SaveImage"]) == 2


def test_he_workflow_replaces_ksampler():
    """Empty latent -> Encrypted Sampler -> VAE Decode -> Save Image, its report shown, both roles in ComfyUI."""
    prompt = json.loads((API / "he_sampler.json").read_text())
    (nid,) = [nid for nid, n in prompt.items() if n["class_type"] == "PrivdiffEncryptedSampler"]
    sampler = prompt[nid]["inputs"]
    assert prompt[sampler["latent_image"][0]]["class_type"] == "EmptyLatentImage" and sampler["denoise"] == 1.0
    assert sampler["worker"] == "" and sampler["threshold"] == 0.01
    # the safest configuration of the README's leak table, and noise the worker cannot recompute from a seed
    assert sampler["packing"] == "dense" and sampler["encrypt_offsets"] is True and sampler["noise"] == "secret"
    (decode,) = [n for n in prompt.values() if n["class_type"] == "VAEDecode"]
    assert decode["inputs"]["samples"] == [nid, 0]
    (report,) = [n for n in prompt.values() if n["class_type"] == "PreviewAny"]
    assert report["inputs"]["source"] == [nid, 1]
    assert not [n for n in prompt.values() if n["class_type"] == "KSampler"]


def test_lora_workflows_train_then_sample_through_the_core_lora_loader():
    """DP LoRA writes my_dp_lora.safetensors and shows its report; the sampling workflow loads that file with the
    core Load LoRA node, whose MODEL and CLIP feed the sampler and both prompts."""
    train = json.loads((API / "dp_lora.json").read_text())
    (nid,) = [nid for nid, n in train.items() if n["class_type"] == "PrivdiffDPLoRA"]
    assert train[nid]["inputs"]["name"] == "my_dp_lora"
    (preview,) = [n for n in train.values() if n["class_type"] == "PreviewAny"]
    assert preview["inputs"]["source"] == [nid, 1]
    sample = json.loads((API / "dp_lora_sample.json").read_text())
    (loader,) = [nid for nid, n in sample.items() if n["class_type"] == "LoraLoader"]
    assert sample[loader]["inputs"]["strength_model"] == 1.0
    (ksampler,) = [n for n in sample.values() if n["class_type"] == "KSampler"]
    assert ksampler["inputs"]["model"] == [loader, 0]
    assert all(n["inputs"]["clip"] == [loader, 1] for n in sample.values() if n["class_type"] == "CLIPTextEncode")


def test_audit_workflow_shows_the_bound_and_releases_nothing():
    """Checkpoint and private images -> DP Audit: Textual Inversion -> Preview Any; no release node, nothing saved."""
    prompt = json.loads((API / "audit_textual_inversion.json").read_text())
    (nid,) = [nid for nid, n in prompt.items() if n["class_type"] == "PrivdiffAuditTextualInversion"]
    audit = prompt[nid]["inputs"]
    assert audit["canaries"] == 64 and audit["confidence"] == 0.95 and audit["method"] == "dpagg"
    (preview,) = [n for n in prompt.values() if n["class_type"] == "PreviewAny"]
    assert preview["inputs"]["source"] == [nid, 0]
    releases = {"PrivdiffDPTextualInversion", "PrivdiffDPAggregateEmbeddings", "PrivdiffDPStyleTarget",
                "PrivdiffSpectralFinetune", "SaveImage"}
    assert not [n for n in prompt.values() if n["class_type"] in releases]
