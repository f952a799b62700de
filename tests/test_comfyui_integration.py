"""The node pack in a real ComfyUI: node definitions, every shipped API workflow, errors, cancellation.

Runs only when COMFYUI_PATH points at a ComfyUI checkout; COMFYUI_PYTHON is the Python that runs it
(default: this one) and must be able to import privdiff's dependencies. The server runs on CPU on a
free port of 127.0.0.1 with ``--base-directory`` set to a temporary folder, so models, embeddings,
inputs, outputs and custom_nodes (a symlink to this pack) never touch the checkout. A tiny random
SD1.5 checkpoint (tests/comfyui_checkpoint.py) stands in for real weights.

  COMFYUI_PATH=~/ComfyUI COMFYUI_PYTHON=~/ComfyUI/venv/bin/python pytest tests/test_comfyui_integration.py
"""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")
if not COMFYUI_PATH:
    pytest.skip("set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its Python) to run the "
                "ComfyUI integration tests", allow_module_level=True)

pytestmark = pytest.mark.comfyui

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
API_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("*.json"))
HOST = "127.0.0.1"
CKPT = "privdiff_tiny_sd15.safetensors"
START_TIMEOUT = 240.0
RUN_TIMEOUT = 900.0
OUR_NODES = ("PrivdiffLoadPrivateImages", "PrivdiffDPTextualInversion", "PrivdiffDPAggregateEmbeddings",
             "PrivdiffDPLoRA", "PrivdiffPrivacyReport", "PrivdiffDPStyleTarget", "PrivdiffGuidedSampler",
             "PrivdiffStyleGuider", "PrivdiffSpectralFinetune", "PrivdiffSpectralSample", "PrivdiffEncryptedSampler",
             "PrivdiffAuditTextualInversion", "PrivdiffAuditAggregateEmbeddings", "PrivdiffAuditStyleTarget",
             "PrivdiffAuditSpectralFinetune")
CLIP_VISION = "privdiff_random_vit_l.safetensors"
N_IMAGES = 4
PUBLIC_PRIOR = "pdtest_public_prior.safetensors"
UPSCALER = "pdtest_compact_x4.safetensors"
SPECTRAL_SIZE, UPSCALE = 32, 4  # the tiny prior's coarse resolution, the random upscaler's factor


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"privdiff_tests_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --- HTTP and a minimal websocket reader (stdlib only, 127.0.0.1 only) -------------------------------------


def _http(url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else {}
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"text": raw.decode(errors="replace")}


class _WebSocket:
    """Reads ComfyUI's JSON messages from ws://HOST:port/ws (unfragmented frames, no extensions)."""

    def __init__(self, port: int, client_id: str, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                           "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            self.buf += self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ConnectionError(f"websocket handshake failed: {head[:200]!r}")

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("websocket closed by the server")
        return data

    def message(self) -> dict | None:
        """The next frame: a JSON message (text frame), or None for any other frame.

        A frame is consumed only once it is complete, so a socket timeout loses nothing."""
        while True:
            frame = self._frame()
            if frame is not None:
                break
            self.buf += self._recv()
        opcode, payload = frame
        if opcode == 8:
            raise ConnectionError("websocket closed by the server")
        return json.loads(payload) if opcode == 1 else None

    def _frame(self) -> tuple[int, bytes] | None:
        buf = self.buf
        if len(buf) < 2:
            return None
        n, at = buf[1] & 0x7F, 2
        if n == 126:
            if len(buf) < 4:
                return None
            n, at = struct.unpack(">H", buf[2:4])[0], 4
        elif n == 127:
            if len(buf) < 10:
                return None
            n, at = struct.unpack(">Q", buf[2:10])[0], 10
        mask = buf[1] & 0x80
        end = at + (4 if mask else 0) + n
        if len(buf) < end:
            return None
        payload = buf[end - n:end]
        if mask:
            key = buf[at:at + 4]
            payload = bytes(c ^ key[i % 4] for i, c in enumerate(payload))
        self.buf = buf[end:]
        return buf[0] & 0x0F, payload

    def close(self) -> None:
        self.sock.close()


# --- the server ------------------------------------------------------------------------------------------------


@dataclass
class Comfy:
    """A running ComfyUI and its temporary base directory."""

    url: str
    port: int
    base: Path
    log: Path
    proc: subprocess.Popen

    @property
    def embeddings(self) -> Path:
        return self.base / "models" / "embeddings"

    @property
    def loras(self) -> Path:
        return self.base / "models" / "loras"

    @property
    def priors(self) -> Path:
        return self.base / "models" / "privdiff_priors"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def queue(self, prompt: dict, client_id: str = "privdiff-tests") -> str:
        status, body = _http(f"{self.url}/prompt", {"prompt": prompt, "client_id": client_id})
        assert status == 200 and "prompt_id" in body, f"POST /prompt failed ({status}): {json.dumps(body)[:3000]}"
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        """The /history entry of ``prompt_id`` once it has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"ComfyUI exited ({self.proc.returncode}):\n{self.log_tail()}"
            _, hist = _http(f"{self.url}/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status["completed"] or status.get("status_str") == "error":
                    return entry
            time.sleep(0.5)
        _http(f"{self.url}/interrupt", {})
        pytest.fail(f"prompt {prompt_id} did not finish in {timeout:.0f}s:\n{self.log_tail()}")

    def run(self, prompt: dict) -> dict:
        """Queue ``prompt``, wait, and return its outputs; fails with the node's error otherwise."""
        entry = self.wait(self.queue(prompt))
        assert entry["status"]["status_str"] == "success", _describe_failure(entry)
        return entry["outputs"]


def _messages(entry: dict, kind: str) -> list[dict]:
    return [m[1] for m in entry["status"].get("messages", []) if m[0] == kind]


def _describe_failure(entry: dict) -> str:
    errors = _messages(entry, "execution_error")
    if not errors:
        return f"prompt failed: {json.dumps(entry['status'])[:3000]}"
    e = errors[0]
    return (f"node {e.get('node_id')} ({e.get('node_type')}) failed: {e.get('exception_type')}: "
            f"{e.get('exception_message')}\n" + "".join(e.get("traceback", [])))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory):
    """ComfyUI with this pack and the tiny checkpoint, in a temporary base directory."""
    base = tmp_path_factory.mktemp("comfyui_base")
    checkpoints = _module("comfyui_checkpoint")
    checkpoints.write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / CKPT)
    checkpoints.write_random_clip_vision(base / "models" / "clip_vision" / CLIP_VISION)
    (base / "models" / "embeddings").mkdir(parents=True)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "privdiff").symlink_to(ROOT, target_is_directory=True)
    _module("test_workflows")  # fail early if the workflow tables do not even import
    port = _free_port()
    log = base / "comfyui.log"
    cmd = [os.environ.get("COMFYUI_PYTHON") or sys.executable, "main.py", "--cpu", "--listen", HOST,
           "--port", str(port), "--database-url", "sqlite:///:memory:", "--fp32-text-enc",
           "--base-directory", str(base), "--disable-auto-launch"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=COMFYUI_PATH, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server = Comfy(f"http://{HOST}:{port}", port, base, log, proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited early ({proc.returncode}):\n{server.log_tail()}")
            try:
                if _http(f"{server.url}/system_stats", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI not ready after {START_TIMEOUT:.0f}s:\n{server.log_tail()}")
            time.sleep(1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def private_images(comfy: Comfy) -> Path:
    """The workflows' default image folder "private_images", inside ComfyUI's input folder."""
    from privdiff.demo.data import write_style_images

    return write_style_images(comfy.base / "input" / "private_images", count=N_IMAGES, size=64)


@pytest.fixture(scope="module")
def per_image_embeddings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-image embedding files (random 768-wide vectors), outside ComfyUI's folders."""
    from privdiff.embeddings.files import Embedding, save_embedding

    folder = tmp_path_factory.mktemp("per_image_embeddings")
    gen = torch.Generator().manual_seed(0)
    for i in range(N_IMAGES):  # one per private image: the ledger charges those images
        vectors = {"clip_l": torch.randn(1, 768, generator=gen) * 0.02}
        save_embedding(Embedding(vectors), folder / f"img_{i}.safetensors")
    return folder


@pytest.fixture(scope="module")
def released_embedding(comfy: Comfy, per_image_embeddings: Path) -> str:
    """A DP embedding with its privacy report in ComfyUI's embeddings folder (made by the library)."""
    from privdiff.embeddings.dpagg import aggregate_embedding_files
    from privdiff.embeddings.files import save_embedding
    from privdiff.release.dp_params import DPParams

    files = sorted(per_image_embeddings.glob("*.safetensors"))
    result = aggregate_embedding_files(files, DPParams(epsilon=4.0, delta=1e-5), dataset_label="tests")
    return save_embedding(result.embedding, comfy.embeddings / "pdtest_released.safetensors").name


def write_public_prior(path: Path) -> Path:
    """A tiny public spectral prior (tokenizer and prior fitted on procedural public images, seconds on a CPU)."""
    from privdiff.reference.shapes import public_dataset
    from privdiff.wavelet.prior import PriorConfig, SpectralPrior, save_prior
    from privdiff.wavelet.tokenizer import fit_tokenizer
    from privdiff.wavelet.training import TrainConfig, pretrain

    images = torch.from_numpy(public_dataset(24, seed=0)[0]).permute(0, 3, 1, 2).float()
    tokenizer = fit_tokenizer(images, size=SPECTRAL_SIZE, base=4, codebook_size=8, iterations=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=16, layers=1, heads=2))
    pretrain(prior, tokenizer.encode(images), TrainConfig(steps=2, batch_size=8))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_prior(prior, tokenizer, path)


@pytest.fixture(scope="module")
def spectral_models(comfy: Comfy) -> Path:
    """The tiny public prior in models/privdiff_priors and a random 4x upscaler in models/upscale_models."""
    write_public_prior(comfy.priors / PUBLIC_PRIOR)
    _module("comfyui_checkpoint").write_random_upscaler(comfy.base / "models" / "upscale_models" / UPSCALER, UPSCALE)
    return comfy.priors


def prepare(workflow: Path, **overrides: dict) -> dict:
    """The API workflow with small sizes and step counts, plus ``overrides`` {class_type: {input: value}};
    inputs are set by node class_type and input name, never by node id."""
    prompt = json.loads(workflow.read_text())
    small = {
        "CheckpointLoaderSimple": {"ckpt_name": CKPT},
        "PrivdiffLoadPrivateImages": {"resolution": 64},
        "PrivdiffDPTextualInversion": {"name": f"pdtest_{workflow.stem}", "steps": 2, "batch_size": 4},
        "PrivdiffDPAggregateEmbeddings": {"name": f"pdtest_{workflow.stem}", "one_image_per_file": True},
        "PrivdiffDPLoRA": {"name": f"pdtest_{workflow.stem}", "steps": 2, "batch_size": 4},
        "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
        "KSampler": {"steps": 2},
        "CLIPVisionLoader": {"clip_name": CLIP_VISION},
        "PrivdiffDPStyleTarget": {"name": f"pdtest_{workflow.stem}"},
        "PrivdiffGuidedSampler": {"target": f"pdtest_{workflow.stem}", "steps": 2, "recurrence": 2},
        "SaveImage": {"filename_prefix": f"pdtest/{workflow.stem}"},
        "PrivdiffSpectralSample": {"prior": PUBLIC_PRIOR, "num_images": 2},
        "UpscaleModelLoader": {"model_name": UPSCALER},
        "ImageScale": {"width": 64, "height": 64},
        "PrivdiffEncryptedSampler": {"steps": 2},
        "PrivdiffAuditTextualInversion": {"steps": 2, "batch_size": 4, "canaries": 8},
    }
    for node in prompt.values():
        for name, value in {**small.get(node["class_type"], {}), **overrides.get(node["class_type"], {})}.items():
            assert name in node["inputs"], f"{workflow.name}: {node['class_type']} has no input {name!r}"
            node["inputs"][name] = value
    return prompt


def _nodes_of(prompt: dict, class_type: str) -> list[str]:
    return [nid for nid, node in prompt.items() if node["class_type"] == class_type]


# --- tests -------------------------------------------------------------------------------------------------------


def test_pack_loads_with_node_definitions(comfy: Comfy):
    failed = [line for line in comfy.log.read_text(errors="replace").splitlines()
              if "IMPORT FAILED" in line and "privdiff" in line]
    assert not failed, comfy.log_tail()
    _, paths = _http(f"{comfy.url}/internal/folder_paths")
    assert Path(paths["embeddings"][0][0] if isinstance(paths["embeddings"][0], list)
                else paths["embeddings"][0]).resolve() == comfy.embeddings.resolve()
    _, info = _http(f"{comfy.url}/object_info")
    tables = _module("test_workflows")
    missing = [n for n in OUR_NODES if n not in info]
    assert not missing, f"nodes missing from /object_info: {missing}\n{comfy.log_tail()}"
    for name, (required, optional, outputs) in tables.NODES.items():
        node = info[name]
        assert node["input_order"].get("required", []) == [n for n, _ in required], f"{name} required inputs"
        assert node["input_order"].get("optional", []) == [n for n, _ in optional], f"{name} optional inputs"
        assert node["output"] == outputs, f"{name} outputs"
        for section, inputs in (("required", required), ("optional", optional)):
            for input_name, typ in inputs:
                spec = node["input"][section][input_name]
                got = "COMBO" if isinstance(spec[0], list) else spec[0]
                assert got == typ, f"{name}.{input_name}: {got} != {typ}"
        if name not in OUR_NODES:
            continue
        assert node["category"] == "privdiff", name
        assert node["description"].strip(), f"{name} has no description"
        assert node["python_module"].startswith("custom_nodes."), name
        for section in ("required", "optional"):
            for input_name, spec in node["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 else {}
                assert opts.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"
        tooltips = node.get("output_tooltips") or []
        assert len(tooltips) == len(outputs) and all(t and t.strip() for t in tooltips), f"{name} output tooltips"
    assert info["PrivdiffPrivacyReport"]["output_node"] is True
    assert all(info[n]["output_node"] is True for n in OUR_NODES if n.startswith("PrivdiffAudit"))


@pytest.fixture(scope="module")
def trained_lora(comfy: Comfy, private_images: Path) -> str:
    """A DP LoRA trained by the shipped workflow's node in ComfyUI (larger steps, so that it changes samples)."""
    name = "pdtest_trained_lora"
    comfy.run(prepare(ROOT / "workflows" / "api" / "dp_lora.json",
                      PrivdiffDPLoRA={"name": name, "learning_rate": 0.1, "steps": 3}))
    return f"{name}.safetensors"


@pytest.mark.parametrize("workflow", API_WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs(comfy: Comfy, private_images: Path, per_image_embeddings: Path, released_embedding: str,
                       spectral_models: Path, trained_lora: str, workflow: Path):
    prompt = prepare(workflow, PrivdiffDPAggregateEmbeddings={"folder": str(per_image_embeddings),
                                                              "images_folder": str(private_images)},
                     PrivdiffPrivacyReport={"embedding": released_embedding}, LoraLoader={"lora_name": trained_lora})
    outputs = comfy.run(prompt)

    for nid in _nodes_of(prompt, "SaveImage"):
        images = outputs[nid]["images"]
        assert images, f"{workflow.name}: SaveImage {nid} saved nothing"
        for img in images:
            assert (comfy.base / "output" / img["subfolder"] / img["filename"]).is_file()

    from privdiff.embeddings.files import inspect_embedding

    for nid in _nodes_of(prompt, "PrivdiffDPTextualInversion") + _nodes_of(prompt, "PrivdiffDPAggregateEmbeddings"):
        name = prompt[nid]["inputs"]["name"]
        info = inspect_embedding(comfy.embeddings / f"{name}.safetensors")
        report = info["privacy_report"]
        assert report is not None, f"{name}.safetensors carries no privacy report"
        assert report["epsilon"] <= prompt[nid]["inputs"]["epsilon"] + 1e-9
        assert report["delta"] == pytest.approx(prompt[nid]["inputs"]["delta"])
        assert report["private"] is True
        assert info["family"] == "SD1" and info["tensors"]
        assert f"embedding:{name} does not exist" not in comfy.log.read_text(errors="replace")
        assert not [p for p in comfy.embeddings.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]

    from privdiff.release.artifact import released_report

    for nid in _nodes_of(prompt, "PrivdiffDPLoRA"):
        name = prompt[nid]["inputs"]["name"]
        report = released_report(comfy.loras / f"{name}.safetensors")
        assert report is not None and report.private and report.epsilon <= prompt[nid]["inputs"]["epsilon"] + 1e-9

    from privdiff.guidance.target import load_target

    for nid in _nodes_of(prompt, "PrivdiffDPStyleTarget"):
        name = prompt[nid]["inputs"]["name"]
        target = load_target(comfy.base / "models" / "privdiff_targets" / f"{name}.safetensors")
        assert target.report.private and target.vector.numel() == 768 and target.encoder.startswith("CLIP vision")

    for nid in _nodes_of(prompt, "PreviewAny"):
        (text,) = outputs[nid]["text"]
        source = prompt[prompt[nid]["inputs"]["source"][0]]["class_type"]
        want = {"PrivdiffEncryptedSampler": "privdiff encrypted denoising",
                "PrivdiffAuditTextualInversion": "audited lower bound"}.get(source, "epsilon")
        assert want in text.lower(), f"{workflow.name}: PreviewAny {nid} shows {text[:300]!r}"
        if source.startswith("PrivdiffAudit"):  # not a release: a bound no higher than the claim, nothing written
            result = json.loads(text.split("\n\n", 1)[1])
            assert result["epsilon_lower_bound"] <= result["claimed_epsilon"] and result["canaries"] == 8
            assert not [p for p in comfy.embeddings.iterdir() if workflow.stem in p.name]

    from PIL import Image

    for nid in _nodes_of(prompt, "PrivdiffSpectralSample"):  # every branch saves the whole batch
        for saver in _nodes_of(prompt, "SaveImage"):
            assert len(outputs[saver]["images"]) == prompt[nid]["inputs"]["num_images"], saver
    for nid in _nodes_of(prompt, "ImageUpscaleWithModel"):
        source = prompt[prompt[nid]["inputs"]["image"][0]]
        if source["class_type"] != "PrivdiffSpectralSample":
            continue
        for saver in [s for s in _nodes_of(prompt, "SaveImage") if prompt[s]["inputs"]["images"] == [nid, 0]]:
            for img in outputs[saver]["images"]:
                with Image.open(comfy.base / "output" / img["subfolder"] / img["filename"]) as saved:
                    assert saved.size == (SPECTRAL_SIZE * UPSCALE,) * 2, f"{workflow.name}: {saved.size}"


def test_empty_image_folder_is_a_clear_error(comfy: Comfy, tmp_path: Path):
    empty = tmp_path / "no_images_here"
    empty.mkdir()
    name = "pdtest_empty_folder"
    prompt = prepare(ROOT / "workflows" / "api" / "dp_textual_inversion.json",
                     PrivdiffLoadPrivateImages={"folder": str(empty)}, PrivdiffDPTextualInversion={"name": name})
    entry = comfy.wait(comfy.queue(prompt))
    assert entry["status"]["status_str"] == "error"
    (error,) = _messages(entry, "execution_error")
    assert str(empty) in error["exception_message"], error["exception_message"]
    assert "\n" not in error["exception_message"].strip(), "the error should be one readable line"
    assert not list(comfy.embeddings.glob(f"{name}*"))


def _interrupt_after_progress(comfy: Comfy, prompt: dict, node: str) -> dict:
    """Queue ``prompt``, interrupt it once ``node`` reports progress, and return its finished /history entry."""
    client_id = str(uuid.uuid4())
    ws = _WebSocket(comfy.port, client_id)
    try:
        prompt_id = comfy.queue(prompt, client_id)
        deadline = time.monotonic() + 600
        while True:
            assert time.monotonic() < deadline, f"no progress from node {node}:\n{comfy.log_tail()}"
            try:
                msg = ws.message()
            except TimeoutError:
                continue
            if not msg:
                continue
            data = msg.get("data", {})
            if msg.get("type") == "execution_error":
                pytest.fail(f"the run failed before the interrupt: {json.dumps(data)[:3000]}")
            if msg.get("type") == "progress" and data.get("node") == node and data.get("value", 0) >= 1:
                break
    finally:
        ws.close()
    assert _http(f"{comfy.url}/interrupt", {"prompt_id": prompt_id})[0] == 200
    entry = comfy.wait(prompt_id, timeout=300)
    assert entry["status"]["status_str"] == "error"
    assert _messages(entry, "execution_interrupted"), json.dumps(entry["status"])[:2000]
    assert not _messages(entry, "execution_error"), _describe_failure(entry)
    return entry


def test_interrupt_during_training(comfy: Comfy, private_images: Path):
    name = "pdtest_interrupted"
    prompt = prepare(ROOT / "workflows" / "api" / "dp_textual_inversion.json",
                     PrivdiffDPTextualInversion={"name": name, "steps": 5000})
    (trainer,) = _nodes_of(prompt, "PrivdiffDPTextualInversion")
    _interrupt_after_progress(comfy, prompt, trainer)
    assert not list(comfy.embeddings.glob(f"{name}*")), "an interrupted run must not leave an embedding"
    assert not [p for p in comfy.embeddings.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


def test_interrupt_during_guided_sampling(comfy: Comfy, private_images: Path):
    prompt = prepare(ROOT / "workflows" / "api" / "dp_guided_sampling.json",
                     PrivdiffGuidedSampler={"steps": 500, "recurrence": 2})
    (sampler,) = _nodes_of(prompt, "PrivdiffGuidedSampler")
    before = set((comfy.base / "output").rglob("*.png")) if (comfy.base / "output").exists() else set()
    _interrupt_after_progress(comfy, prompt, sampler)
    assert set((comfy.base / "output").rglob("*.png")) == before, "an interrupted sampling must save nothing"


def test_requeueing_after_another_graph_does_not_release_again(comfy: Comfy, private_images: Path):
    name = "pdtest_requeue"
    train = prepare(ROOT / "workflows" / "api" / "dp_textual_inversion.json", PrivdiffDPTextualInversion={"name": name})
    first = comfy.run(train)
    written = (comfy.embeddings / f"{name}.safetensors").read_bytes()
    comfy.run(prepare(ROOT / "workflows" / "api" / "privacy_report.json",
                      PrivdiffPrivacyReport={"embedding": f"{name}.safetensors"}))  # ComfyUI's cache now holds this
    again = comfy.run(train)
    assert (comfy.embeddings / f"{name}.safetensors").read_bytes() == written
    texts = [t for out in again.values() for t in out.get("text", [])]
    assert any("released before" in t for t in texts), (texts, first)
    ledger = json.loads((comfy.base / "user" / "privdiff" / "ledger.json").read_text())
    assert sum(r["output"].endswith(f"{name}.safetensors") for r in ledger["releases"].values()) == 1


def _sample_with_lora(comfy: Comfy, lora: str, strength: float, seed: int = 0) -> bytes:
    """The PNG the shipped LoRA sampling workflow saves with ``lora`` at ``strength``."""
    prompt = prepare(ROOT / "workflows" / "api" / "dp_lora_sample.json",
                     LoraLoader={"lora_name": lora, "strength_model": strength, "strength_clip": strength},
                     KSampler={"seed": seed})
    outputs = comfy.run(prompt)
    (saver,) = _nodes_of(prompt, "SaveImage")
    (image,) = outputs[saver]["images"]
    return (comfy.base / "output" / image["subfolder"] / image["filename"]).read_bytes()


def test_dp_lora_loads_in_the_core_lora_loader_and_leaves_the_model_as_it_was(comfy: Comfy, private_images: Path,
                                                                             trained_lora: str):
    """Every key of a LoRA trained in ComfyUI is one ComfyUI's LoraLoader applies; it changes the samples, and
    training left the checkpoint's model as it was (strength 0 samples the same before and after another run)."""
    from safetensors import safe_open

    with safe_open(str(comfy.loras / trained_lora), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("lora_unet_input_blocks_") or k.startswith("lora_unet_middle_block_")
                        or k.startswith("lora_unet_output_blocks_") for k in keys), keys[:4]
    base = _sample_with_lora(comfy, trained_lora, 0.0, seed=7)
    assert _sample_with_lora(comfy, trained_lora, 1.0, seed=7) != base
    assert "lora key not loaded" not in comfy.log.read_text(errors="replace")
    comfy.run(prepare(ROOT / "workflows" / "api" / "dp_lora.json", PrivdiffDPLoRA={"name": "pdtest_lora_again"}))
    assert _sample_with_lora(comfy, trained_lora, 0.0, seed=7) == base


def test_guidance_gradient_reaches_the_samples(comfy: Comfy, private_images: Path):
    """Gradients flow through UNet, VAE and CLIP vision inside ComfyUI's prompt: w > 0 changes the image."""
    import numpy as np
    from PIL import Image

    pixels = {}
    for weight in (0.0, 50.0):
        prompt = prepare(ROOT / "workflows" / "api" / "dp_guided_sampling.json",
                         PrivdiffGuidedSampler={"guidance_weight": weight, "recurrence": 1},
                         SaveImage={"filename_prefix": f"pdtest/guided_w{weight:g}"})
        outputs = comfy.run(prompt)
        (saver,) = _nodes_of(prompt, "SaveImage")
        (image,) = outputs[saver]["images"]
        pixels[weight] = np.asarray(Image.open(comfy.base / "output" / image["subfolder"] / image["filename"]))
    assert np.abs(pixels[0.0].astype(int) - pixels[50.0].astype(int)).max() > 0


def test_style_guider_drives_sampler_custom_advanced(comfy: Comfy, private_images: Path):
    prompt = prepare(ROOT / "workflows" / "api" / "dp_guided_sampling.json",
                     SaveImage={"filename_prefix": "pdtest/guider"})
    (nid,) = _nodes_of(prompt, "PrivdiffGuidedSampler")
    given = prompt[nid]["inputs"]
    kept = ("model", "positive", "negative", "vae", "clip_vision", "target")
    prompt[nid] = {"class_type": "PrivdiffStyleGuider",
                   "inputs": {**{k: given[k] for k in kept}, "cfg": 3.0, "guidance_weight": 50.0}}
    prompt["90"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}}
    prompt["91"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    prompt["92"] = {"class_type": "BasicScheduler",
                    "inputs": {"model": given["model"], "scheduler": "normal", "steps": 2, "denoise": 1.0}}
    prompt["93"] = {"class_type": "SamplerCustomAdvanced",
                    "inputs": {"noise": ["90", 0], "guider": [nid, 0], "sampler": ["91", 0], "sigmas": ["92", 0],
                               "latent_image": given["latent_image"]}}
    (decode,) = _nodes_of(prompt, "VAEDecode")
    prompt[decode]["inputs"]["samples"] = ["93", 0]
    outputs = comfy.run(prompt)
    (saver,) = _nodes_of(prompt, "SaveImage")
    assert outputs[saver]["images"], "SamplerCustomAdvanced with the style guider saved nothing"


# --- audits -----------------------------------------------------------------------------------------------------


def test_audit_nodes_show_a_bound_and_write_nothing(comfy: Comfy, private_images: Path, per_image_embeddings: Path,
                                                     spectral_models: Path):
    """The audit twins of DP Aggregate Embeddings, DP Style Target and DP Spectral Fine-tune (the textual inversion
    one runs as a shipped workflow): each shows its bound and leaves every output folder and the ledger as it was."""
    audit = {"canaries": 8, "confidence": 0.95}
    prompt = {
        "1": {"class_type": "PrivdiffLoadPrivateImages", "inputs": {"folder": "private_images", "resolution": 64}},
        "2": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}},
        "3": {"class_type": "PrivdiffAuditStyleTarget",
              "inputs": {"dataset": ["1", 0], "clip_vision": ["2", 0], "epsilon": 2.0, "delta": 1e-5,
                         "sample_rate": 1.0, **audit}},
        "4": {"class_type": "PrivdiffAuditAggregateEmbeddings",
              "inputs": {"folder": str(per_image_embeddings), "one_image_per_file": True, "epsilon": 2.0,
                         "delta": 1e-5, "noise_multiplier": 0.0, "sample_rate": 1.0, "clip_norm": 1.0,
                         "bound": "clip", **audit}},
        "5": {"class_type": "PrivdiffAuditSpectralFinetune",
              "inputs": {"prior": PUBLIC_PRIOR, "folder": "private_images", "epsilon": 8.0, "delta": 1e-5,
                         "sample_rate": 0.5, "clip_norm": 1.0, "steps": 2, "learning_rate": 1e-3, **audit}},
    }
    folders = [comfy.embeddings, comfy.priors, comfy.base / "models" / "privdiff_targets", comfy.base / "user"]

    def state() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for f in folders if f.is_dir() for p in sorted(f.rglob("*")) if p.is_file()}

    before = state()
    outputs = comfy.run(prompt)
    for nid, kind in (("3", "guidance-target"), ("4", "aggregate"), ("5", "wavelet-finetune")):
        (text,) = outputs[nid]["text"]
        assert text.startswith("audited lower bound ") and "no ledger charged" in text.splitlines()[0], text[:300]
        result = json.loads(text.split("\n\n", 1)[1])
        assert result["kind"] == kind and result["canaries"] == 8
        assert result["epsilon_lower_bound"] <= result["claimed_epsilon"]
    assert state() == before


# --- spectral DP ------------------------------------------------------------------------------------------------


def _finetune_prompt(name: str, folder: str = "private_images", **inputs: object) -> dict:
    node = {"prior": PUBLIC_PRIOR, "folder": folder, "name": name, "epsilon": 8.0, "delta": 1e-5,
            "sample_rate": 0.5, "clip_norm": 1.0, "steps": 3, "learning_rate": 1e-3, "overwrite": False, **inputs}
    return {"1": {"class_type": "PrivdiffSpectralFinetune", "inputs": node},
            "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}


def test_spectral_finetune_releases_a_dp_prior_that_samples(comfy: Comfy, private_images: Path,
                                                             spectral_models: Path):
    from privdiff.wavelet.prior import load_prior

    name = "pdtest_spectral"
    outputs = comfy.run(_finetune_prompt(name))
    (text,) = outputs["2"]["text"]
    assert "PRIVATE release" in text and "epsilon=" in text, text
    path = comfy.priors / f"{name}.safetensors"
    report = load_prior(path).report
    assert report is not None and report.private and report.epsilon <= 8.0 + 1e-9 and report.steps == 3
    assert report.release_id in text
    assert not [p for p in comfy.priors.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    checkpoints = comfy.base / "user" / "privdiff" / "checkpoints"
    assert checkpoints.is_dir() and not list(checkpoints.iterdir()), "the private checkpoint must not outlive it"
    ledger = json.loads((comfy.base / "user" / "privdiff" / "ledger.json").read_text())
    assert [r for r in ledger["releases"].values() if r["output"].endswith(f"{name}.safetensors")]

    prompt = prepare(ROOT / "workflows" / "api" / "spectral_dp.json",  # the new file is in the prior combo
                     PrivdiffSpectralSample={"prior": path.name}, SaveImage={"filename_prefix": "pdtest/dp_prior"})
    sampled = comfy.run(prompt)
    for saver in _nodes_of(prompt, "SaveImage"):
        assert len(sampled[saver]["images"]) == 2


def test_spectral_finetune_bad_input_is_a_clear_error(comfy: Comfy, spectral_models: Path, tmp_path: Path):
    empty = tmp_path / "no_images_here"
    empty.mkdir()
    name = "pdtest_spectral_empty"
    entry = comfy.wait(comfy.queue(_finetune_prompt(name, folder=str(empty))))
    assert entry["status"]["status_str"] == "error"
    (error,) = _messages(entry, "execution_error")
    assert str(empty) in error["exception_message"], error["exception_message"]
    assert "\n" not in error["exception_message"].strip(), "the error should be one readable line"
    assert not list(comfy.priors.glob(f"{name}*"))


def test_interrupt_during_spectral_finetune(comfy: Comfy, private_images: Path, spectral_models: Path):
    name = "pdtest_spectral_interrupted"
    _interrupt_after_progress(comfy, _finetune_prompt(name, steps=100000), "1")
    assert not list(comfy.priors.glob(f"{name}*")), "an interrupted run must not leave a prior"
    assert not [p for p in comfy.priors.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    # A charge stays only with a checkpoint to resume from (written every 50 steps), and the other way round.
    ledger_file = comfy.base / "user" / "privdiff" / "ledger.json"  # a cancelled first reservation removes it
    ledger = json.loads(ledger_file.read_text()) if ledger_file.exists() else {"releases": {}}
    charged = [r for r in ledger["releases"].values() if r["output"].endswith(f"{name}.safetensors")]
    kept = list((comfy.base / "user" / "privdiff" / "checkpoints").iterdir())
    assert len(charged) == len(kept) <= 1 and all(r["status"] != "committed" for r in charged), (charged, kept)


def test_spandrel_upscaler_runs_in_comfyui_python(tmp_path: Path):
    """privdiff.wavelet.upsample in ComfyUI's own Python, where spandrel and torchvision import."""
    upscaler = _module("comfyui_checkpoint").write_random_upscaler(tmp_path / "compact_x4.safetensors", UPSCALE)
    prior = write_public_prior(tmp_path / "public.safetensors")
    (tmp_path / "not_a_model.safetensors").write_bytes(b"not a model")
    code = f"""
import json, torch
from privdiff.errors import PrivdiffError
from privdiff.wavelet.upsample import load_upscaler, upscale
from privdiff.wavelet.workflow import sample_prior

model = load_upscaler({str(upscaler)!r})
coarse, _ = sample_prior({str(prior)!r}, 2, seed=0)
out = upscale(coarse, model)
try:
    load_upscaler({str(tmp_path / "not_a_model.safetensors")!r})
    error = None
except PrivdiffError as exc:
    error = str(exc)
print(json.dumps({{"arch": model.architecture.name, "scale": model.scale, "coarse": list(coarse.shape),
                  "shape": list(out.shape), "min": out.min().item(), "max": out.max().item(),
                  "std": out.std().item(), "error": error}}))
"""
    python = os.environ.get("COMFYUI_PYTHON") or sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["arch"] == "RealESRGAN Compact" and result["scale"] == UPSCALE
    assert result["coarse"] == [2, 3, SPECTRAL_SIZE, SPECTRAL_SIZE]
    assert result["shape"] == [2, 3, SPECTRAL_SIZE * UPSCALE, SPECTRAL_SIZE * UPSCALE]
    assert 0 <= result["min"] <= result["max"] <= 1 and result["std"] > 0
    assert result["error"] and "\n" not in result["error"] and "not_a_model" in result["error"], result["error"]


# --- encrypted denoising ----------------------------------------------------------------------------------------


def _he_prompt(sampler: str, steps: int = 3, **inputs: object) -> dict:
    """The shipped HE workflow (small), its latent also saved by SaveLatent under pdtest/he_<sampler>."""
    prompt = prepare(ROOT / "workflows" / "api" / "he_sampler.json",
                     PrivdiffEncryptedSampler={"sampler_name": sampler, "steps": steps, **inputs},
                     SaveImage={"filename_prefix": f"pdtest/he_{sampler}"})
    (nid,) = _nodes_of(prompt, "PrivdiffEncryptedSampler")
    prompt["90"] = {"class_type": "SaveLatent",
                    "inputs": {"samples": [nid, 0], "filename_prefix": f"pdtest/he_{sampler}"}}
    return prompt


def _saved_latent(comfy: Comfy, outputs: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    (latent,) = outputs["90"]["latents"]
    return load_file(comfy.base / "output" / latent["subfolder"] / latent["filename"])["latent_tensor"]


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "ddim"])
def test_encrypted_sampler_noise_is_secret_unless_seeded(comfy: Comfy, sampler: str):
    """The shipped defaults (dense, encrypted offsets, secret noise) give a new latent every run; noise = seed
    gives the same latent for the same seed. (That the encrypted steps are k-diffusion's, noise for noise, is
    tests/test_he_frontend.py's; KSampler draws its noise from torch's generator, so the two no longer match.)"""
    def seeded() -> torch.Tensor:
        return _saved_latent(comfy, comfy.run(_he_prompt(sampler, scheduler="karras", noise="seed", seed=7,
                                                         packing="sparse", threshold=0.05)))

    before = seeded()
    secret = _he_prompt(sampler, scheduler="karras")
    outputs = comfy.run(secret)
    (report,) = outputs[_nodes_of(secret, "PreviewAny")[0]]["text"]
    assert f"denoising: {sampler}," in report and "scheduler karras" in report
    assert "both roles in this process" in report and "dense packing" in report
    assert "the offsets encrypted" in report and "not recorded" in report
    first = _saved_latent(comfy, outputs)  # the same prompt again runs again: secret noise is never cached
    assert not torch.allclose(first, _saved_latent(comfy, comfy.run(_he_prompt(sampler, scheduler="karras"))))
    after = seeded()  # other prompts ran in between, so this one ran again too
    assert first.shape == after.shape and after.abs().max() > 0
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4), (before - after).abs().max()


def test_encrypted_sampler_img2img_and_worker_process(comfy: Comfy):
    """denoise < 1 runs the tail of the schedule; a `privdiff he worker` does the worker's part."""
    import threading

    from privdiff.he.protocol import WorkerServer

    server = WorkerServer((HOST, 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"{HOST}:{server.server_address[1]}"
    try:
        prompt = _he_prompt("euler", steps=2, denoise=0.5, worker=address, packing="dense", encrypt_offsets=True)
        outputs = comfy.run(prompt)
    finally:
        server.shutdown()
        server.server_close()
    (report,) = outputs[_nodes_of(prompt, "PreviewAny")[0]]["text"]
    assert f"worker at {address}" in report and "dense packing" in report and "offsets encrypted" in report
    assert _saved_latent(comfy, outputs).abs().max() > 0


@pytest.mark.parametrize(("inputs", "message"), [
    ({"worker": "no-port-here"}, "is not HOST:PORT"),
    ({"worker": f"{HOST}:1"}, "unreachable"),
])
def test_encrypted_sampler_bad_input_is_a_clear_error(comfy: Comfy, inputs: dict, message: str):
    entry = comfy.wait(comfy.queue(_he_prompt("euler", **inputs)))
    assert entry["status"]["status_str"] == "error"
    (error,) = _messages(entry, "execution_error")
    assert message in error["exception_message"], error["exception_message"]
    assert "\n" not in error["exception_message"].strip(), "the error should be one readable line"


def test_encrypted_sampler_threshold_out_of_range_is_refused(comfy: Comfy):
    status, body = _http(f"{comfy.url}/prompt", {"prompt": _he_prompt("euler", threshold=1.0)})
    assert status == 400 and "threshold" in json.dumps(body), body


def test_interrupt_during_encrypted_sampling(comfy: Comfy):
    prompt = _he_prompt("euler", steps=1000)
    (sampler,) = _nodes_of(prompt, "PrivdiffEncryptedSampler")
    before = set((comfy.base / "output").rglob("*.png")) if (comfy.base / "output").exists() else set()
    _interrupt_after_progress(comfy, prompt, sampler)
    assert set((comfy.base / "output").rglob("*.png")) == before, "an interrupted sampling must save nothing"
