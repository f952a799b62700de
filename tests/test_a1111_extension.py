"""The A1111 extension without A1111: the tab's logic over a stand-in host and model, the install script's
decisions, and what the extension imports."""

import copy
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from extension import install, logic
from privdiff.demo_data import write_style_images
from privdiff.embeddings.files import load_embedding
from privdiff.privacy.ledger import BudgetLedger

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("a1111_standin", Path(__file__).with_name("a1111_standin.py"))
standin = sys.modules.setdefault("a1111_standin", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(standin)


@dataclass
class FakeHost:
    """The tab's Host over folders in ``root`` and a stand-in model; ``state`` mimics ``shared.state``."""

    root: Path
    model: object = None
    forge: bool = False
    names: set = field(default_factory=set)
    reloads: int = 0
    state: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(interrupted=False))
    interrupt_at: int | None = None

    def sd_model(self):
        if self.model is None:
            raise logic.PrivdiffError("no checkpoint is loaded: pick one in the Stable Diffusion checkpoint menu")
        return self.model

    def _folder(self, name):
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def embeddings_dir(self):
        return self._folder("embeddings")

    def embedding_names(self):
        return self.names

    def reload_embeddings(self):
        self.reloads += 1
        self.names = {p.stem for p in self.embeddings_dir().iterdir()}

    def default_ledger(self):
        return self._folder("data") / "ledger.json"

    def targets_dir(self):
        return self._folder("targets")

    def outputs_dir(self):
        return self._folder("outputs")

    def progress(self, label):
        inner = logic.state_progress(self.state, label)

        def progress(done, total):
            if self.interrupt_at is not None and done >= self.interrupt_at:
                self.state.interrupted = True
            inner(done, total)

        return progress


@pytest.fixture
def host(tmp_path, tiny_sd1):
    return FakeHost(tmp_path, standin.StandInModel(copy.deepcopy(tiny_sd1)))


@pytest.fixture(scope="module")
def private(tmp_path_factory):
    return write_style_images(tmp_path_factory.mktemp("private"), count=6, size=32)


def form(images, **overrides):
    options = dict(images=str(images), name="dp_style", epsilon=8.0, delta=1e-3, steps=2, batch_size=3,
                   resolution=32)
    return logic.TrainForm(**{**options, **overrides})


def _spent(host):
    path = host.default_ledger()
    return BudgetLedger(path).summary()["releases"] if path.is_file() else []


@pytest.mark.parametrize("method", ["dpagg", "dpsgd"])
def test_training_writes_a_reloaded_embedding_with_its_report(host, private, method):
    report, status = logic.train(host, form(private, method=method, sample_rate=0.5 if method == "dpsgd" else 1.0))
    path = host.embeddings_dir() / "dp_style.safetensors"
    assert status == "wrote dp_style: use it in a prompt, e.g. a painting in the style of dp_style"
    assert "PRIVATE release" in report and path.is_file() and host.reloads == 1 and "dp_style" in host.names
    assert load_embedding(path).vectors["clip_l"].shape == (1, 768)
    assert host.state.sampling_step == host.state.sampling_steps > 0 and host.state.job_count == 1
    assert len(_spent(host)) == 1
    assert "PRIVATE release" in logic.report(host, "dp_style.safetensors")
    assert '"epsilon": 8.0' in logic.ledger(host, "")


def test_bad_input_is_one_line_and_writes_nothing(host, private, tmp_path):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    host.names = {"taken"}
    cases = [
        (form(tmp_path / "empty"), "empty"),
        (form(corrupt), "broken.png"),
        (form(private, delta=0.5), "delta"),
        (form(private, name="taken"), "already loaded"),
        (form(private, name="../escape"), "name"),
        (form(private, epsilon=float("nan")), "epsilon"),
    ]
    for bad, needle in cases:
        report, status = logic.train(host, bad)
        assert report == "" and status.startswith("privdiff: ") and "\n" not in status and needle in status, status
    host.model = None
    assert "no checkpoint is loaded" in logic.train(host, form(private))[1]
    host.forge = True
    assert logic.train(host, form(private))[1] == logic.FORGE_MESSAGE
    assert not any(host.embeddings_dir().iterdir()) and not _spent(host) and host.reloads == 0


def test_interrupt_leaves_no_file_and_no_charge(host, private):
    host.interrupt_at = 1
    report, status = logic.train(host, form(private, steps=3))
    assert report == "" and status.startswith("privdiff: interrupted")
    assert not any(host.embeddings_dir().iterdir()) and not _spent(host)
    assert BudgetLedger(host.default_ledger()).summary()["releases"] == [] if host.default_ledger().is_file() else True


def test_tools_inspect_and_convert(host, private):
    logic.train(host, form(private, name="tooled"))
    info = json.loads(logic.inspect(host, "tooled.safetensors"))
    assert info["family"] == "SD1" and info["privacy_report"]["epsilon"] == 8.0
    assert logic.convert(host, "tooled.safetensors", "a1111-pt", "", False).startswith("wrote ")
    assert (host.embeddings_dir() / "tooled.pt").is_file() and host.reloads == 2
    assert logic.convert(host, "tooled.safetensors", "a1111-pt", "", False).startswith("privdiff: ")
    assert logic.embedding_files(host.embeddings_dir()) == ["tooled.pt", "tooled.safetensors"]
    assert logic.inspect(host, "missing.pt").startswith("privdiff: ")
    assert logic.ledger(host, str(host.root / "none.json")).startswith("privdiff: ledger")


def test_style_target_and_guided_sampling(host, private):
    target_form = logic.TargetForm(images=str(private), name="target", image_encoder="tiny", epsilon=2.0,
                                   delta=1e-3)
    report, status = logic.make_target(host, target_form)
    assert "PRIVATE release" in report and (host.targets_dir() / "target.safetensors").is_file(), status
    guided = logic.GuidedForm(target="target", image_encoder="tiny", prompt="a painting of a cat", num_images=2,
                              width=32, height=32, steps=2, seed=3)
    files, status = logic.guided_sample(host, guided)
    assert len(files) == 2 and all(f.parent == host.outputs_dir() for f in files), status
    again, _ = logic.guided_sample(host, guided)
    assert again[0].read_bytes() != b"" and len(_spent(host)) == 1  # sampling spends nothing
    wrong = logic.GuidedForm(**{**guided.__dict__, "width": 30})
    assert logic.guided_sample(host, wrong)[1].startswith("privdiff: height/width")


def test_state_progress_follows_a1111_state():
    state = SimpleNamespace(interrupted=False)
    progress = logic.state_progress(state, "privdiff: job")
    progress(3, 10)
    assert (state.job_count, state.sampling_step, state.sampling_steps, state.textinfo) == (1, 3, 10, "privdiff: job")
    state.interrupted = True
    with pytest.raises(logic.Interrupted):
        progress(4, 10)


def test_install_plan_never_touches_the_hosts_packages(tmp_path):
    installed = {"torch": "2.1.2", "gradio": "3.41.2", "tqdm": "4.66.1", "filelock": "3.0.0"}
    wanted = ["opacus>=1.5", "tqdm", "filelock>=3.12", "gradio>=4"]
    to_install, notices = install.plan(wanted, installed, install._satisfied)
    assert to_install == ["opacus>=1.5"] and len(notices) == 2 and "filelock 3.0.0" in notices[0]
    to_install, notices = install.plan(wanted, installed, install._satisfied, host={"gradio", "torch"})
    assert to_install == ["opacus>=1.5", "filelock>=3.12"]  # not pinned by the web UI: upgraded
    assert len(notices) == 1 and "gradio 3.41.2 is pinned" in notices[0] and "\n" not in notices[0]
    assert install.constraints(installed).splitlines() == ["filelock==3.0.0", "gradio==3.41.2", "torch==2.1.2",
                                                           "tqdm==4.66.1"]
    pins = tmp_path / "requirements_versions.txt"
    pins.write_text("# A1111\nGitPython==3.1.32\ngradio==3.41.2\npydantic==1.10.11\nclean-fid\n")
    assert install.protected(pins) == {"gitpython", "gradio", "pydantic", *install.HOST_PACKAGES}
    assert install.constraints(installed, install.protected(pins)).splitlines() == ["gradio==3.41.2", "torch==2.1.2"]
    assert install.protected(tmp_path / "missing.txt") is None
    assert install.installed_versions()["torch"] == torch.__version__


def test_install_shim_does_nothing_outside_a1111(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout == run.stderr == ""


def test_extension_imports_without_diffusers_gradio_or_a1111():
    """A1111's venv has no diffusers and its own transformers: the extension's import path needs neither."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('diffusers', 'transformers', 'gradio', 'modules'):\n"
        "            raise ImportError(f'blocked {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import extension.a1111, extension.host, extension.install, extension.logic, extension.ui\n"
        "import extension.a1111_backend, extension.api, extension.tabs.guidance, extension.tabs.reports\n"
        "import extension.tabs.textual_inversion, extension.tabs.tools\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]
