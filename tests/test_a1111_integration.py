"""privdiff inside a real AUTOMATIC1111 webui 1.10.x (CPU, offline): runs when A1111_PATH is set.

See tests/a1111_webui.py for the environment it needs. Slow (minutes): the webui starts once per module.
"""

import base64
import importlib.util
import io
import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
from packaging.version import Version
from PIL import Image

from privdiff.demo.data import write_style_images

_spec = importlib.util.spec_from_file_location("a1111_webui", Path(__file__).with_name("a1111_webui.py"))
webui_harness = sys.modules.setdefault("a1111_webui", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(webui_harness)

pytestmark = [pytest.mark.a1111,
              pytest.mark.skipif(webui_harness.webui_path() is None, reason="A1111_PATH is not set")]

PINNED = ("torch", "gradio", "transformers", "pydantic", "fastapi", "numpy", "pillow", "safetensors")


def _freeze() -> dict[str, str]:
    out = subprocess.run([webui_harness.python(), "-m", "pip", "list", "--format=freeze"], capture_output=True,
                         text=True, check=True, timeout=300).stdout
    return {line.split("==")[0].lower(): line.split("==")[1] for line in out.splitlines() if "==" in line}


@pytest.fixture(scope="module")
def installed():
    """install.py run as A1111 runs it: (packages before, packages after, its result)."""
    before = _freeze()
    result = webui_harness.run_installer()
    return before, _freeze(), result


@pytest.fixture(scope="module")
def webui(tmp_path_factory, installed):
    data = tmp_path_factory.mktemp("a1111-data")
    webui_harness.prepare(data)
    server = webui_harness.WebUI(data)
    yield server
    server.stop()


def _txt2img_answer(webui, prompt: str, seed: int = 1) -> dict:
    return webui.call("/sdapi/v1/txt2img", {"prompt": prompt, "seed": seed, "steps": 2, "width": 64, "height": 64,
                                            "sampler_name": "Euler", "cfg_scale": 5, "batch_size": 1})


def _pixels(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))


def _txt2img(webui, prompt: str, seed: int = 1) -> np.ndarray:
    return _pixels(_txt2img_answer(webui, prompt, seed))


def test_install_changes_no_installed_package(installed):
    before, after, result = installed
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p: after.get(p) for p in before} == before  # pinned by the web UI (PINNED) or not (attrs, ...)
    assert {p: before.get(p) for p in PINNED} == {p: after.get(p) for p in PINNED}
    assert "opacus" in after and "dp-accounting" in after  # dp-accounting despite its attrs<24 cap (attrs kept)
    if Version(after["torch"]) < Version("2.4"):  # opacus 1.5.4 registers nn.RMSNorm (torch 2.4)
        assert Version(after["opacus"]) < Version("1.5.4")


def test_extension_loads_and_its_tab_is_in_the_page(webui):
    config = webui.call("/config")
    ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
    assert {"privdiff_ti_train", "privdiff_ti_status", "privdiff_lora_train", "privdiff_tabs", "privdiff_spectral",
            "privdiff_spectral_finetune", "privdiff_spectral_sample", "privdiff_he", "privdiff_he_generate"} <= ids
    assert any(c.get("props", {}).get("label") == "privdiff" for c in config["components"])
    progress = [d for d in config["dependencies"] if "requestProgress" in (d.get("js") or "")]
    assert len(progress) == 8  # TI, LoRA, style target, guided and spectral sampling, spectral fine-tune, HE, audit
    errors = [line for line in webui.log.read_text().splitlines() if "Error" in line]
    assert not [line for line in errors if "privdiff" in line or str(webui_harness.ROOT) in line], errors


def test_training_in_the_tab_gives_a_prompt_word_and_leaves_txt2img_unchanged(webui, tmp_path):
    before = _txt2img(webui, "a painting of a cat")
    private = write_style_images(tmp_path / "private", count=4, size=64)
    fields = {"images": str(private), "name": "privdiff_int", "epsilon": 8.0, "delta": 1e-3, "steps": 2,
              "batch_size": 2, "resolution": 64, "ledger": str(tmp_path / "ledger.json")}
    answer = webui.call("/privdiff/v1/textual-inversion", fields)
    assert answer["ok"] and "PRIVATE release" in answer["report"], answer["status"]
    assert (webui.data / "embeddings" / "privdiff_int.safetensors").is_file()
    assert "privdiff_int" in webui.call("/sdapi/v1/embeddings")["loaded"]
    with_embedding = _txt2img(webui, "a painting in the style of privdiff_int")
    assert with_embedding.shape == (64, 64, 3)
    np.testing.assert_array_equal(_txt2img(webui, "a painting of a cat"), before)
    assert "PRIVATE release" in webui.call("/privdiff/v1/report?file=privdiff_int.safetensors")["report"]


def test_dp_lora_tab_writes_a_lora_that_prompts_use(webui, tmp_path):
    """The LoRA lands in the Lora folder and list, <lora:NAME:1> changes txt2img and its infotext records it, and
    the checkpoint samples as before without it."""
    before = _txt2img(webui, "a painting of a cat")
    private = write_style_images(tmp_path / "private", count=4, size=64)
    fields = {"images": str(private), "name": "privdiff_lora", "epsilon": 8.0, "delta": 1e-3, "steps": 3,
              "batch_size": 2, "learning_rate": 0.1, "resolution": 64, "ledger": str(tmp_path / "ledger.json")}
    answer = webui.call("/privdiff/v1/lora", fields)
    assert answer["ok"] and "PRIVATE release" in answer["report"], answer["status"]
    assert "<lora:privdiff_lora:1>" in answer["status"]
    assert "privdiff_lora" in [lora["name"] for lora in webui.call("/sdapi/v1/loras")]
    used = _txt2img_answer(webui, "a painting of a cat <lora:privdiff_lora:1>")
    assert "privdiff_lora" in json.loads(used["info"])["infotexts"][0]
    assert not np.array_equal(_pixels(used), before)
    np.testing.assert_array_equal(_txt2img(webui, "a painting of a cat"), before)
    again = webui.call("/privdiff/v1/lora", {**fields, "name": "privdiff_lora", "overwrite": True})
    assert "released before" in again["report"]


def test_bad_input_is_one_line_and_writes_nothing(webui, tmp_path):
    private = write_style_images(tmp_path / "private", count=4, size=64)
    for fields, needle in [({"images": str(private), "name": "bad_delta", "delta": 0.5}, "delta"),
                           ({"images": str(tmp_path / "missing"), "name": "bad_folder"}, "missing"),
                           ({"images": str(private), "name": "privdiff_int"}, "already")]:
        answer = webui.call("/privdiff/v1/textual-inversion", {"steps": 1, "resolution": 64, **fields})
        assert not answer["ok"] and answer["status"].startswith("privdiff: ") and needle in answer["status"]
        assert "\n" not in answer["status"]
    assert not (webui.data / "embeddings" / "bad_delta.safetensors").exists()
    with pytest.raises(urllib.error.HTTPError):
        webui.call("/privdiff/v1/textual-inversion", {"images": str(private), "name": "x", "unknown_field": 1})
    log_before = webui.log.read_text()
    required = {"textual-inversion": {"images": str(private), "name": "typed"}, "he-sample": {"prompt": "a cat"},
                "spectral-sample": {"prior": "p"}}
    for route, field, value in [("textual-inversion", "epsilon", "four"), ("textual-inversion", "steps", "three"),
                                ("he-sample", "steps", "two"), ("spectral-sample", "num_images", [1])]:
        body = {**required[route], field: value}
        with pytest.raises(urllib.error.HTTPError) as refused:
            webui.call(f"/privdiff/v1/{route}", body)
        detail = json.loads(refused.value.read())["detail"]
        assert refused.value.code == 422 and detail.startswith("privdiff: ") and field in detail, detail
        assert "\n" not in detail
    assert "Traceback" not in webui.log.read_text()[len(log_before):]


def test_dpsgd_baseline_in_the_webui(webui, tmp_path):
    """The tab's DP-SGD baseline (opacus 1.5.3 on torch 2.1.2 in A1111 1.10.1's venv)."""
    private = write_style_images(tmp_path / "private", count=4, size=64)
    fields = {"images": str(private), "name": "privdiff_dpsgd", "method": "dpsgd", "epsilon": 8.0, "delta": 1e-3,
              "sample_rate": 0.5, "steps": 2, "batch_size": 2, "resolution": 64, "ledger": str(tmp_path / "l.json")}
    answer = webui.call("/privdiff/v1/textual-inversion", fields)
    assert answer["ok"] and "PRIVATE release" in answer["report"] and "DP-SGD" in answer["report"], answer["status"]
    assert "privdiff_dpsgd" in webui.call("/sdapi/v1/embeddings")["loaded"]


def test_audit_in_the_webui(webui, tmp_path):
    """The Audit sub-tab's route on the web UI's loaded model: a bound, no embedding, no ledger."""
    private = write_style_images(tmp_path / "private", count=4, size=64)
    before = set(webui.call("/sdapi/v1/embeddings")["loaded"])
    fields = {"kind": "ti-aggregate", "images": str(private), "epsilon": 1.0, "delta": 1e-3, "steps": 1,
              "batch_size": 4, "resolution": 64, "canaries": 8}
    answer = webui.call("/privdiff/v1/audit", fields)
    assert answer["ok"] and "claimed epsilon 1.00" in answer["result"], answer["status"]
    assert '"kind": "ti-aggregate"' in answer["result"] and "not a release" in answer["result"]
    assert set(webui.call("/sdapi/v1/embeddings")["loaded"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private"]
    bad = webui.call("/privdiff/v1/audit", {**fields, "canaries": 1})
    assert not bad["ok"] and "canaries" in bad["status"] and "\n" not in bad["status"]


def _tiny_upscaler(path: Path) -> Path:
    """A random 2x ESRGAN file, written with the web UI's own spandrel (A1111 1.10 ships it)."""
    code = ("import sys, torch\nfrom spandrel.architectures.ESRGAN import RRDBNet\n"
            "torch.save(RRDBNet(num_filters=8, num_blocks=1, scale=2).state_dict(), sys.argv[1])\n")
    subprocess.run([webui_harness.python(), "-c", code, str(path)], check=True, timeout=300, env=webui_harness.env())
    return path


def _image(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_spectral_finetune_and_sampling_in_the_webui(webui, tmp_path, public_prior):
    before = _txt2img(webui, "a painting of a cat")
    private = write_style_images(tmp_path / "private", count=4, size=32)
    fields = {"images": str(private), "prior": str(public_prior),
              "name": "privdiff_spectral", "epsilon": 8.0, "delta": 1e-3, "sample_rate": 0.5, "steps": 2,
              "learning_rate": 1e-3, "ledger": str(tmp_path / "ledger.json")}
    answer = webui.call("/privdiff/v1/spectral-finetune", fields)
    assert answer["ok"] and "PRIVATE release" in answer["report"], answer["status"]
    assert "the guarantee covers this prior" in answer["report"]
    assert (webui.data / "models" / "privdiff_priors" / "privdiff_spectral.safetensors").is_file()
    checkpoints = webui.data / "privdiff" / "checkpoints"
    assert checkpoints.is_dir() and not any(checkpoints.iterdir())  # private state, removed once released

    again = webui.call("/privdiff/v1/spectral-finetune", fields)  # the same request: the earlier release
    assert again["ok"] and "released before" in again["report"]
    other = webui.call("/privdiff/v1/spectral-finetune", {**fields, "epsilon": 9.0})
    assert not other["ok"] and other["status"].startswith("privdiff: ") and "already exists" in other["status"]

    sample = {"prior": "privdiff_spectral", "num_images": 2, "seed": 3}
    answer = webui.call("/privdiff/v1/spectral-sample", {**sample, "upsampling": "upscaler",
                                                         "upscaler": str(_tiny_upscaler(tmp_path / "2x.pth"))})
    assert answer["ok"] and "DP prior (epsilon=8" in answer["status"], answer["status"]
    assert [_image(f).shape for f in answer["files"]] == [(32, 32, 3)] * 2
    answer = webui.call("/privdiff/v1/spectral-sample", {**sample, "upsampling": "SD refine", "refine_size": 64,
                                                         "refine_steps": 4, "refine_prompt": "a painting"})
    assert answer["ok"] and [_image(f).shape for f in answer["files"]] == [(64, 64, 3)] * 2, answer["status"]
    np.testing.assert_array_equal(_txt2img(webui, "a painting of a cat"), before)


def test_encrypted_denoising_in_the_webui(webui):
    before = _txt2img(webui, "a painting of a cat")
    fields = {"prompt": "a painting of a cat", "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler": "euler"}
    answer = webui.call("/privdiff/v1/he-sample", fields)
    assert answer["ok"] and "both roles in this process" in answer["report"], answer["status"]
    assert [Path(f).parent.name for f in answer["files"]] == ["privdiff-he"]
    assert _image(answer["files"][0]).shape == (64, 64, 3)
    bad = webui.call("/privdiff/v1/he-sample", {**fields, "threshold": 1.0})
    assert not bad["ok"] and bad["status"].startswith("privdiff: threshold"), bad["status"]
    np.testing.assert_array_equal(_txt2img(webui, "a painting of a cat"), before)


def _tiny_image_encoder(path: Path) -> Path:
    """A random CLIP vision folder for 32 px images, written with the web UI's own transformers."""
    code = ("import sys, torch\nfrom transformers import CLIPVisionConfig, CLIPVisionModelWithProjection\n"
            "torch.manual_seed(0)\nconfig = CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=16, "
            "num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)\n"
            "CLIPVisionModelWithProjection(config).save_pretrained(sys.argv[1], safe_serialization=True)\n")
    subprocess.run([webui_harness.python(), "-c", code, str(path)], check=True, timeout=300, env=webui_harness.env())
    return path


def test_style_guidance_and_the_ledger_in_the_webui(webui, tmp_path):
    """DP style guidance and the ledger view have no route: through the tab's own events (gradio's API)."""
    before = _txt2img(webui, "a painting of a cat")
    encoder = str(_tiny_image_encoder(tmp_path / "encoder"))
    private = write_style_images(tmp_path / "private", count=4, size=32)
    ledger = tmp_path / "ledger.json"
    report, status = webui.click(("privdiff_guidance_target_report", "privdiff_target_status"), {
        "privdiff_guidance_encoder": encoder, "privdiff_guidance_images": str(private),
        "privdiff_guidance_name": "privdiff_style", "privdiff_guidance_epsilon": 8.0,
        "privdiff_guidance_delta": 1e-3, "privdiff_guidance_ledger": str(ledger)})
    assert "PRIVATE release" in report and "wrote style target" in status, status
    assert (webui.data / "models" / "privdiff_targets" / "privdiff_style.safetensors").is_file()
    gallery, status = webui.click(("privdiff_guidance_gallery", "privdiff_sample_status"), {
        "privdiff_guidance_encoder": encoder, "privdiff_guidance_target": "privdiff_style",
        "privdiff_guidance_prompt": "a painting", "privdiff_guidance_width": 64, "privdiff_guidance_height": 64,
        "privdiff_guidance_steps": 2, "privdiff_guidance_seed": 1})
    assert "spends no budget" in status and len(gallery) == 1, status
    assert _image(gallery[0]["name"]).shape == (64, 64, 3)
    np.testing.assert_array_equal(_txt2img(webui, "a painting of a cat"), before)
    (summary,) = webui.click(("privdiff_reports_summary",), {"privdiff_reports_ledger_path": str(ledger)})
    assert summary.startswith(f"ledger {ledger}\n"), summary
    assert len(json.loads(summary.split("\n", 1)[1])["releases"]) == 1
    assert "PRIVATE release" in webui.call("/privdiff/v1/report?file=privdiff_style.safetensors")["report"]


def test_embedding_tools_and_report_in_the_webui(webui):
    """Embedding tools and the report view, through the tab's events, on the embedding trained above."""
    name = "privdiff_int.safetensors"
    (choices,) = webui.click(("privdiff_tools_choice",))  # the refresh button
    assert name in choices["choices"]
    (inspected,) = webui.click(("privdiff_tools_result",), {"privdiff_tools_choice": name})
    assert not inspected.startswith("privdiff:"), inspected
    assert json.loads(inspected)["token"] == "privdiff_int" and json.loads(inspected)["privacy_report"]
    result, _ = webui.click(("privdiff_tools_result", "privdiff_tools_choice"), {
        "privdiff_tools_choice": name, "privdiff_tools_fmt": "a1111-pt", "privdiff_tools_output": "privdiff_pt.pt"})
    assert result.startswith("wrote ") and (webui.data / "embeddings" / "privdiff_pt.pt").is_file(), result
    assert "privdiff_pt" in webui.call("/sdapi/v1/embeddings")["loaded"]
    (report,) = webui.click(("privdiff_reports_report",), {"privdiff_reports_choice": name})
    assert "PRIVATE release" in report
    (refused,) = webui.click(("privdiff_reports_report",), {"privdiff_reports_choice": "../config.json"})
    assert refused.startswith("privdiff: ") and "\n" not in refused
