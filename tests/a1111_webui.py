"""Starts a real AUTOMATIC1111 webui (1.10.x, CPU, offline, ``--api``) with privdiff installed, for the
integration tests and the tab screenshot. Nothing of A1111 lives in this repository: point it at a checkout.

Environment:
- ``A1111_PATH``: the stable-diffusion-webui checkout (its ``repositories/`` and requirements in place).
- ``A1111_PYTHON``: the webui's Python (default ``$A1111_PATH/venv/bin/python``).
- ``HF_HOME``: a Hugging Face cache holding openai/clip-vit-large-patch14's tokenizer and config, which
  A1111 reads even for random weights (it runs with HF_HUB_OFFLINE=1).

The data folder (``--data-dir``) gets ``extensions/privdiff`` (a link to this repository), a config that
puts the privdiff tab first and keeps the run offline, and a tiny random SD1 checkpoint
(``tests/a1111_checkpoint.py``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = "tiny_sd1.safetensors"
FLAGS = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
         "--skip-python-version-check", "--use-cpu", "all", "--no-half", "--precision", "full", "--no-half-vae",
         "--no-download-sd-model", "--do-not-download-clip", "--api", "--disable-safe-unpickle",
         "--disable-nan-check"]  # a random-weight model may overflow on a noisy embedding; that is not under test
CONFIG = {"live_previews_enable": False, "show_progress_every_n_steps": -1, "sd_checkpoint_cache": 0,
          "samples_save": False, "grid_save": False, "auto_launch_browser": "Disable", "ui_tab_order": ["privdiff"],
          "sd_model_checkpoint": CHECKPOINT}


def webui_path() -> Path | None:
    path = os.environ.get("A1111_PATH")
    return Path(path) if path else None


def python() -> str:
    return os.environ.get("A1111_PYTHON") or str(webui_path() / "venv" / "bin" / "python")


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
            "DO_NOT_TRACK": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2",
            "PYTHONPATH": str(webui_path())}  # as A1111 runs extension installers


def prepare(data: Path) -> None:
    """The data folder: the extension link, the config and the checkpoint."""
    (data / "extensions").mkdir(parents=True, exist_ok=True)
    link = data / "extensions" / "privdiff"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    (data / "config.json").write_text(json.dumps(CONFIG))
    checkpoints = data / "models" / "Stable-diffusion"
    checkpoints.mkdir(parents=True, exist_ok=True)
    if not (checkpoints / CHECKPOINT).is_file():
        subprocess.run([sys.executable, str(ROOT / "tests" / "a1111_checkpoint.py"), str(checkpoints / CHECKPOINT)],
                       check=True, timeout=600)


def run_installer() -> subprocess.CompletedProcess:
    """The extension's install.py, run the way A1111 runs extension installers."""
    return subprocess.run([python(), str(ROOT / "install.py")], cwd=webui_path(), env=env(), capture_output=True,
                          text=True, timeout=1200)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WebUI:
    """A running webui on ``port``; ``log`` is its console output."""

    def __init__(self, data: Path, port: int | None = None, timeout: float = 900) -> None:
        self.data, self.port = data, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data / "webui.log"
        args = [python(), "launch.py", *FLAGS, "--port", str(self.port), "--data-dir", str(data),
                "--ckpt-dir", str(data / "models" / "Stable-diffusion"), "--embeddings-dir", str(data / "embeddings")]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(args, cwd=webui_path(), env=env(), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"A1111 did not start; its log ends with:\n{self.log.read_text()[-3000:]}")
            time.sleep(2)

    def _up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/sdapi/v1/sd-models", timeout=5):
                return True
        except OSError:
            return False

    def call(self, path: str, body: dict | None = None, timeout: float = 1200) -> dict:
        """GET (no body) or POST JSON to ``path``; the decoded JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.url}{path}", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def click(self, outputs: tuple[str, ...], fields: dict[str, object] | None = None, timeout: float = 1200) -> list:
        """Run the page's event whose outputs are the components ``outputs`` (elem_ids) through gradio's HTTP API, as
        its button does, with the page's default values for its inputs but ``fields`` (elem_id: value); the outputs'
        values. This is the tab's own code path, for sub-tabs that have no ``/privdiff/v1`` route."""
        fields = fields or {}
        config = self.call("/config")
        props = {c["id"]: c.get("props", {}) for c in config["components"]}
        by_elem = {p.get("elem_id"): cid for cid, p in props.items() if p.get("elem_id")}
        wanted = [by_elem[e] for e in outputs]
        index = next(i for i, d in enumerate(config["dependencies"]) if d["outputs"] == wanted)
        inputs = config["dependencies"][index]["inputs"]
        unknown = set(fields) - {props[c].get("elem_id") for c in inputs}
        if unknown:
            raise KeyError(f"not inputs of that event: {sorted(unknown)}")
        data = [fields.get(props[c].get("elem_id"), props[c].get("value")) for c in inputs]
        return self.call("/run/predict", {"fn_index": index, "data": data, "session_hash": "privdiff-tests"},
                         timeout)["data"]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
