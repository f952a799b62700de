"""The A1111 extension without A1111: the tab's logic over a stand-in host and model, the install script's
decisions, and what the extension imports."""

import copy
import importlib.util
import json
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from extension import install
from extension.logic import (
    audit,
    common,
    forms,
    guidance,
    he,
    lora,
    paths,
    reports,
    spectral,
    textual_inversion,
    tools,
)
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import load_embedding
from privdiff.errors import PrivdiffError
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
    lora_reloads: int = 0
    state: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(interrupted=False))
    interrupt_at: int | None = None

    def sd_model(self):
        if self.model is None:
            raise PrivdiffError("no checkpoint is loaded: pick one in the Stable Diffusion checkpoint menu")
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

    def loras_dir(self):
        return self._folder("loras")

    def lora_names(self):
        return {p.stem for p in self.loras_dir().iterdir()} if self.lora_reloads else set()

    def reload_loras(self):
        self.lora_reloads += 1

    def targets_dir(self):
        return self._folder("targets")

    def outputs_dir(self, folder=common.GUIDED_FOLDER):
        return self._folder(f"outputs/{folder}")

    def priors_dir(self):
        return self._folder("priors")

    def checkpoints_dir(self):
        return self._folder("data/checkpoints")

    def refresh_button(self, component, choices, elem_id):
        import gradio as gr

        button = gr.Button("\U0001f504", elem_id=elem_id)
        button.click(fn=lambda: gr.update(choices=choices()), inputs=[], outputs=[component])
        return button

    def progress(self, label):
        inner = common.state_progress(self.state, label)

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
    return textual_inversion.TrainForm(**{**options, **overrides})


def _spent(host):
    path = host.default_ledger()
    return BudgetLedger(path).summary()["releases"] if path.is_file() else []


@pytest.mark.parametrize("method", ["dpagg", "dpsgd"])
def test_training_writes_a_reloaded_embedding_with_its_report(host, private, method):
    report, status = textual_inversion.train(host, form(private, method=method,
                                                        sample_rate=0.5 if method == "dpsgd" else 1.0))
    path = host.embeddings_dir() / "dp_style.safetensors"
    assert status == "wrote dp_style: use it in a prompt, e.g. a painting in the style of dp_style"
    assert "PRIVATE release" in report and path.is_file() and host.reloads == 1 and "dp_style" in host.names
    assert load_embedding(path).vectors["clip_l"].shape == (1, 768)
    assert host.state.sampling_step == host.state.sampling_steps > 0 and host.state.job_count == 1
    assert len(_spent(host)) == 1
    assert "PRIVATE release" in reports.report(host, "dp_style.safetensors")
    assert '"epsilon": 8.0' in reports.ledger(host, "")


def test_dp_lora_writes_a_listed_lora_with_its_report_and_leaves_the_model_as_it_was(host, private):
    from safetensors import safe_open

    unet = host.model.model.diffusion_model
    before = {name: type(m) for name, m in unet.named_modules()}
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    options = dict(images=str(private), name="dp_lora", epsilon=8.0, delta=1e-3, steps=2, batch_size=3, resolution=32)
    report, status = lora.train(host, lora.LoRAForm(**options))
    path = host.loras_dir() / "dp_lora.safetensors"
    assert status == "wrote dp_lora: use it in a prompt with <lora:dp_lora:1>", status
    assert "PRIVATE release" in report and "DP-LoRA" in report and host.lora_reloads == 1
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys) and meta["ss_network_module"] == "networks.lora"
    assert {name: type(m) for name, m in unet.named_modules()} == before  # the adapters came off
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags
    assert len(_spent(host)) == 1
    # the same request again: the earlier release, neither trained nor charged again
    again, status = lora.train(host, lora.LoRAForm(**options, overwrite=True))
    assert "released before" in again and len(_spent(host)) == 1
    _, status = lora.train(host, lora.LoRAForm(**options))
    assert status == "privdiff: a LoRA named 'dp_lora' is already listed; pick another name or enable overwrite"
    for bad, needle in [({"rank": 0}, "rank"), ({"alpha": float("nan")}, "alpha"), ({"delta": 0.5}, "delta"),
                        ({"targets": "conv"}, "targets"), ({"name": "../x"}, "name"), ({"steps": 2.5}, "steps")]:
        report, status = lora.train(host, lora.LoRAForm(**{**options, "name": "other", **bad}))
        assert report == "" and status.startswith("privdiff: ") and needle in status, (bad, status)
    assert sorted(p.name for p in host.loras_dir().iterdir()) == ["dp_lora.safetensors"] and len(_spent(host)) == 1


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
        report, status = textual_inversion.train(host, bad)
        assert report == "" and status.startswith("privdiff: ") and "\n" not in status and needle in status, status
    host.model = None
    assert "no checkpoint is loaded" in textual_inversion.train(host, form(private))[1]
    host.forge = True
    assert textual_inversion.train(host, form(private))[1] == common.FORGE_MESSAGE
    assert not any(host.embeddings_dir().iterdir()) and not _spent(host) and host.reloads == 0


def test_interrupt_leaves_no_file_and_no_charge(host, private):
    host.interrupt_at = 1
    report, status = textual_inversion.train(host, form(private, steps=3))
    assert report == "" and status.startswith("privdiff: interrupted")
    assert not any(host.embeddings_dir().iterdir()) and not _spent(host)
    assert BudgetLedger(host.default_ledger()).summary()["releases"] == [] if host.default_ledger().is_file() else True


def test_tools_inspect_and_convert(host, private):
    textual_inversion.train(host, form(private, name="tooled"))
    info = json.loads(tools.inspect(host, "tooled.safetensors"))
    assert info["family"] == "SD1" and info["privacy_report"]["epsilon"] == 8.0
    assert tools.convert(host, "tooled.safetensors", "a1111-pt", "", False).startswith("wrote ")
    assert (host.embeddings_dir() / "tooled.pt").is_file() and host.reloads == 2
    assert tools.convert(host, "tooled.safetensors", "a1111-pt", "", False).startswith("privdiff: ")
    assert paths.embedding_files(host.embeddings_dir()) == ["tooled.pt", "tooled.safetensors"]
    assert tools.inspect(host, "missing.pt").startswith("privdiff: ")
    assert reports.ledger(host, str(host.root / "none.json")).startswith("privdiff: ledger")
    outside = host.root / "outside.safetensors"  # with --listen, these tools must not probe the file system
    outside.write_bytes((host.embeddings_dir() / "tooled.safetensors").read_bytes())
    for name in (str(outside), "../outside.safetensors", "~/outside.safetensors"):
        assert "must be a name inside" in tools.inspect(host, name)
        assert "must be a name inside" in tools.convert(host, name, "a1111-pt", "", False)
    for output in (str(host.root / "out.pt"), "../out.pt"):
        assert "must be a name inside" in tools.convert(host, "tooled.safetensors", "a1111-pt", output, True)
    assert not (host.root / "out.pt").exists()


def test_style_target_and_guided_sampling(host, private):
    target_form = guidance.TargetForm(images=str(private), name="target", image_encoder="tiny", epsilon=2.0,
                                   delta=1e-3)
    report, status = guidance.make_target(host, target_form)
    assert "PRIVATE release" in report and (host.targets_dir() / "target.safetensors").is_file(), status
    shown = reports.report(host, "target.safetensors")  # the Reports view and route read targets too
    assert shown.startswith(report) and '"mechanism"' in shown
    guided = guidance.GuidedForm(target="target", image_encoder="tiny", prompt="a painting of a cat", num_images=2,
                              width=32, height=32, steps=2, seed=3)
    files, status = guidance.guided_sample(host, guided)
    assert len(files) == 2 and all(f.parent == host.outputs_dir() for f in files), status
    again, _ = guidance.guided_sample(host, guided)
    assert again[0].read_bytes() != b"" and len(_spent(host)) == 1  # sampling spends nothing
    wrong = guidance.GuidedForm(**{**guided.__dict__, "width": 30})
    assert guidance.guided_sample(host, wrong)[1].startswith("privdiff: height/width")


def test_state_progress_follows_a1111_state():
    state = SimpleNamespace(interrupted=False)
    progress = common.state_progress(state, "privdiff: job")
    progress(3, 10)
    assert (state.job_count, state.sampling_step, state.sampling_steps, state.textinfo) == (1, 3, 10, "privdiff: job")
    state.interrupted = True
    with pytest.raises(common.Interrupted):
        progress(4, 10)


A1111_STACK = {"torch": "2.1.2+cu121", "torchvision": "0.16.2", "gradio": "3.41.2", "attrs": "26.1.0",
               "tqdm": "4.66.1", "filelock": "3.0.0", "safetensors": "0.4.2", "cryptography": "42.0.1"}
"""A1111 1.10.1's documented stack (a few packages), with a filelock older than privdiff wants."""


class FakePip:
    """``launch.run_pip``: records each command and the constraints it ran with; fails for ``refuse``."""

    def __init__(self, refuse=(), with_deps_only=False):
        self.calls, self.refuse, self.with_deps_only = [], refuse, with_deps_only

    def __call__(self, command, desc):
        pins = command.split('-c "')[1].split('"')[0]
        self.calls.append((command.rsplit(" ", 1)[-1].strip('"'), Path(pins).read_text().splitlines()))
        if "--no-deps" in command:
            self.calls[-1] = ("--no-deps " + self.calls[-1][0], self.calls[-1][1])
        if any(name in command for name in self.refuse) and not (self.with_deps_only and "--no-deps" in command):
            raise RuntimeError("Couldn't install privdiff requirement.\nCommand: pip install\nstdout: The conflict "
                               "is caused by:\n    tenseal 0.3.16 depends on attrs<24\n    The user requested "
                               "(constraint) attrs==26.1.0\nERROR: ResolutionImpossible")


def test_install_adds_only_whats_missing_and_pins_every_installed_package():
    pip = FakePip()
    notices = install.install(pip, dict(A1111_STACK))
    assert [r for r, _ in pip.calls] == ["opacus>=1.5,<1.5.4", "dp-accounting>=0.5,<0.7", "PyWavelets>=1.4",
                                         "tenseal>=0.3.14"]  # opacus 1.5.4+ needs torch 2.4
    assert all(pins == [f"{n}=={v}" for n, v in sorted(A1111_STACK.items())] for _, pins in pip.calls)
    assert "attrs==26.1.0" in pip.calls[0][1]  # not pinned by A1111, still never moved
    assert notices == ["privdiff: filelock 3.0.0 is installed but privdiff needs filelock>=3.12 (with torch "
                       "2.1.2+cu121); left unchanged, so the privdiff tab is unavailable"]


def test_install_picks_opacus_for_the_torch_it_finds_and_never_replaces_one():
    assert "opacus>=1.5,<1.7" in install.requirements("2.4.0") and "opacus>=1.5,<1.7" in install.requirements(None)
    assert "opacus>=1.5,<1.5.4" in install.requirements("2.3.1+cpu")
    pip = FakePip()
    notices = install.install(pip, {**A1111_STACK, "opacus": "1.5.4", "filelock": "3.13.1"})
    assert "opacus" not in str([r for r, _ in pip.calls]) and len(notices) == 1
    assert notices[0].startswith("privdiff: opacus 1.5.4 is installed but privdiff needs opacus>=1.5,<1.5.4")
    pip = FakePip()
    assert install.install(pip, {**A1111_STACK, "torch": "2.5.1", "opacus": "1.5.4", "filelock": "3.13.1"}) == []


def test_install_reports_a_requirement_it_cannot_meet_in_one_line_and_goes_on():
    pip = FakePip(refuse=("tenseal",))
    notices = install.install(pip, {**A1111_STACK, "filelock": "3.13.1"})
    assert len(pip.calls) == 4 and len(notices) == 1 and "\n" not in notices[0]
    assert notices == ["privdiff: could not install tenseal>=0.3.14 without changing an installed package "
                       "(attrs==26.1.0), so Encrypted denoising is unavailable"]
    notices = install.install(FakePip(refuse=("dp-accounting", "dm-tree")), {**A1111_STACK, "filelock": "3.13.1"})
    assert notices == ["privdiff: could not install dp-accounting>=0.5,<0.7 without changing an installed package "
                       "(attrs==26.1.0), so the pld accountant, which DPAgg textual inversion and DP style targets "
                       "need (replace-one), is unavailable"]
    assert install.install(FakePip(), {**A1111_STACK, "filelock": "3.13.1", "opacus": "1.5.3", "tenseal": "0.3.16",
                                       "dp-accounting": "0.5.0", "pywavelets": "1.6.0"}) == []


def test_install_keeps_attrs_where_dp_accounting_caps_it():
    """A1111 1.10.1 has attrs 26.1.0; dp-accounting 0.5+ declares attrs<24 (and works with 26): its other
    dependencies go in as usual, then dp-accounting alone, attrs untouched (pip once moved it to 23.2.0)."""
    pip = FakePip(refuse=("dp-accounting",), with_deps_only=True)
    assert install.install(pip, {**A1111_STACK, "filelock": "3.13.1"}) == []
    assert [r for r, _ in pip.calls][1:7] == ["dp-accounting>=0.5,<0.7", "absl-py>=1.0,<3", "dm-tree~=0.1.8",
                                              "mpmath~=1.2", "scipy~=1.7", "--no-deps dp-accounting>=0.5,<0.7"]
    assert all("attrs==26.1.0" in pins for _, pins in pip.calls)


def test_unmet_requirements_are_named_for_the_tab():
    lines = install.unmet({**A1111_STACK, "filelock": "3.13.1", "opacus": "1.5.4"})
    assert any(line.startswith("privdiff: opacus 1.5.4 is installed") for line in lines)
    assert "privdiff: tenseal>=0.3.14 is not installed, so Encrypted denoising is unavailable" in lines
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
        "import extension.callbacks, extension.settings, extension.host, extension.install, extension.ui\n"
        "import extension.a1111_backend, extension.api, extension.tabs.guidance, extension.tabs.reports\n"
        "import extension.tabs.he, extension.tabs.spectral, extension.tabs.textual_inversion, extension.tabs.tools\n"
        "import extension.tabs.widgets, extension.logic.common, extension.logic.forms, extension.logic.paths\n"
        "import extension.logic.textual_inversion, extension.logic.guidance, extension.logic.spectral\n"
        "import extension.logic.he, extension.logic.reports, extension.logic.tools\n"
        "import extension.tabs.audit, extension.logic.audit\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "ok", run.stderr[-2000:]


def spectral_form(images, **overrides):
    options = dict(images=str(images), prior="public", name="dp_prior", epsilon=8.0, delta=1e-3, sample_rate=0.5,
                   steps=2, learning_rate=1e-3)
    return spectral.SpectralForm(**{**options, **overrides})


def _with_public(host, public_prior):
    (host.priors_dir() / "public.safetensors").write_bytes(public_prior.read_bytes())
    return host


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_spectral_finetune_writes_a_dp_prior_with_its_report_and_samples_from_it(host, private, public_prior):
    from privdiff.wavelet.prior import load_prior

    _with_public(host, public_prior)
    report, status = spectral.spectral_finetune(host, spectral_form(private))
    path = host.priors_dir() / "dp_prior.safetensors"
    assert status.startswith("wrote DP prior dp_prior.safetensors in "), status
    assert "PRIVATE release" in report and "the guarantee covers this prior" in report and "resumed" not in report
    assert load_prior(path).report.epsilon == 8.0 and load_prior(path).report.steps == 2
    assert host.state.sampling_step == host.state.sampling_steps == 2 and host.state.textinfo.endswith("fine-tune")
    assert [r["status"] for r in _spent(host)] == ["committed"]
    assert not any(host.checkpoints_dir().iterdir())  # released: the private checkpoint is gone
    assert spectral.prior_files(host.priors_dir()) == ["dp_prior.safetensors", "public.safetensors"]
    assert reports.report(host, "dp_prior.safetensors").startswith(report.split("\nnote:")[0])
    assert "carries no privdiff privacy report" in reports.report(host, "public.safetensors")

    files, status = spectral.spectral_sample(host, spectral.SpectralSampleForm(prior="dp_prior", num_images=2, seed=5))
    assert len(files) == 2 and all(f.parent == host.outputs_dir() for f in files), status
    assert "from a DP prior (epsilon=8, delta=0.001)" in status and "spend no budget" in status
    assert _pixels(files[0]).shape == (16, 16, 3) and len(_spent(host)) == 1
    settings = json.loads(Image.open(files[0]).text["parameters"])
    assert settings["seed"] == 5 and settings["prior_release_id"] == load_prior(path).report.release_id
    assert settings["prior"] == "dp_prior.safetensors"  # its base name, never the folder it lives in


def test_spectral_finetune_bad_input_is_one_line_and_writes_nothing(host, private, public_prior, tmp_path):
    _with_public(host, public_prior)
    (host.priors_dir() / "taken.safetensors").write_bytes(public_prior.read_bytes())
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "broken.png").write_bytes(b"not a png")
    (tmp_path / "empty").mkdir()
    before = sorted(host.priors_dir().iterdir())
    cases = [
        (spectral_form(tmp_path / "empty"), "holds no images"),
        (spectral_form(corrupt), "broken.png"),  # found after the charge: the reservation is cancelled
        (spectral_form(private, delta=0.5), "delta"),
        (spectral_form(private, epsilon=float("nan")), "epsilon"),
        (spectral_form(private, name="../escape"), "prior name"),
        (spectral_form(private, name="taken"), "already exists"),
        (spectral_form(private, name="public", overwrite=True), "overwrite the public prior"),
        (spectral_form(private, prior="missing"), "does not exist"),
        (spectral_form(private, prior=""), "pick a prior"),
        (spectral_form(private, steps=0), "steps"),
        (spectral_form(private, steps=2.5), "whole number"),
        (spectral_form(private, learning_rate=float("inf")), "learning rate"),
    ]
    for bad, needle in cases:
        report, status = spectral.spectral_finetune(host, bad)
        assert report == "" and status.startswith("privdiff: ") and "\n" not in status and needle in status, status
    assert sorted(host.priors_dir().iterdir()) == before and not any(host.checkpoints_dir().iterdir())
    assert not _spent(host)


def test_spectral_finetune_interrupt_leaves_no_file_and_resumes_after_a_checkpoint(host, private, public_prior,
                                                                                    monkeypatch):
    from privdiff.wavelet import workflow

    _with_public(host, public_prior)
    host.interrupt_at = 1
    report, status = spectral.spectral_finetune(host, spectral_form(private, steps=3))
    assert report == "" and status.startswith("privdiff: interrupted: nothing was written and nothing was charged")
    assert not (host.priors_dir() / "dp_prior.safetensors").exists() and not _spent(host)
    assert not any(host.checkpoints_dir().iterdir())

    # a checkpoint every step: an interrupt after one keeps the release charged, and the same request resumes it
    checkpoint = workflow.Checkpoint
    monkeypatch.setattr(workflow, "Checkpoint", lambda path, every: checkpoint(path, 1))
    host.state.interrupted, host.interrupt_at = False, 2
    report, status = spectral.spectral_finetune(host, spectral_form(private, steps=3))
    assert report == "" and "stays charged" in status and "run the same fine-tune again" in status, status
    assert not (host.priors_dir() / "dp_prior.safetensors").exists()
    assert [r["status"] for r in _spent(host)] == ["reserved"] and len(list(host.checkpoints_dir().iterdir())) == 1
    host.state.interrupted, host.interrupt_at = False, None
    report, status = spectral.spectral_finetune(host, spectral_form(private, steps=3))
    assert "resumed an interrupted fine-tune" in report and status.startswith("wrote DP prior"), status
    assert [r["status"] for r in _spent(host)] == ["committed"] and not any(host.checkpoints_dir().iterdir())


def test_spectral_sample_writes_images_and_upsamples_bicubic(host, public_prior):
    _with_public(host, public_prior)
    sample = spectral.SpectralSampleForm(prior=str(host.priors_dir() / "public.safetensors"), num_images=2, seed=1)
    files, status = spectral.spectral_sample(host, sample)
    assert len(files) == 2 and "from a public prior" in status and "spend no budget" in status, status
    again, _ = spectral.spectral_sample(host, sample)
    np.testing.assert_array_equal(_pixels(again[0]), _pixels(files[0]))  # the same seed gives the same images
    bicubic, status = spectral.spectral_sample(host, spectral.SpectralSampleForm(prior="public", num_images=1,
                                                                           upsampling="bicubic", scale=3))
    assert _pixels(bicubic[0]).shape == (48, 48, 3), status
    assert json.loads(Image.open(bicubic[0]).text["parameters"])["scale"] == 3

    written = sorted(host.outputs_dir().iterdir())
    cases = [
        (dict(prior="missing"), "does not exist"),
        (dict(upsampling="lanczos"), "unknown upsampling"),
        (dict(num_images=0), "number of images"),
        (dict(temperature=0.0), "temperature"),
        (dict(upsampling="bicubic", scale=1), "bicubic scale"),
        (dict(upsampling="upscaler"), "pick an upscaler"),
        (dict(upsampling="upscaler", upscaler=str(host.root / "missing.pth")), ""),  # no spandrel or no file
        (dict(upsampling="SD refine", strength=0.0), "strength"),
        (dict(upsampling="SD refine", refine_size=36), "multiple of 8"),
        (dict(upsampling="SD refine", refine_steps=0), "refine steps"),
    ]
    for fields, needle in cases:
        files, status = spectral.spectral_sample(host, spectral.SpectralSampleForm(**{"prior": "public", **fields}))
        assert files == [] and status.startswith("privdiff: ") and "\n" not in status and needle in status, status
    host.interrupt_at = 1
    assert spectral.spectral_sample(host, sample)[1].startswith("privdiff: interrupted")
    host.state.interrupted, host.interrupt_at = False, None
    refined = spectral.SpectralSampleForm(prior="public", upsampling="SD refine", refine_size=32)
    host.model = None
    assert "no checkpoint is loaded" in spectral.spectral_sample(host, refined)[1]
    host.forge = True
    assert spectral.spectral_sample(host, refined)[1] == common.FORGE_MESSAGE
    assert sorted(host.outputs_dir().iterdir()) == written
    assert len(spectral.spectral_sample(host, sample)[0]) == 2  # sampling the prior needs no SD model: works on Forge


def test_spectral_sample_refines_with_the_loaded_checkpoint(host, public_prior):
    _with_public(host, public_prior)
    flags = {name: p.requires_grad for name, p in host.model.named_parameters()}
    form = spectral.SpectralSampleForm(prior="public", num_images=5, seed=2, upsampling="SD refine",
                                    refine_prompt="a painting", refine_size=32, refine_steps=4, strength=0.5)
    files, status = spectral.spectral_sample(host, form)
    assert len(files) == 5 and all(_pixels(f).shape == (32, 32, 3) for f in files), status
    # 2 of the 4 DDIM steps lie below strength 0.5, for 2 batches (4 + 1 images): 4 UNet calls
    assert (host.state.textinfo, host.state.sampling_step, host.state.sampling_steps) == ("privdiff: SD refine", 4, 4)
    settings = json.loads(Image.open(files[0]).text["parameters"])
    assert settings["refine_prompt"] == "a painting" and settings["strength"] == 0.5 and settings["refine_size"] == 32
    assert {name: p.requires_grad for name, p in host.model.named_parameters()} == flags


def he_form(**overrides):
    options = dict(prompt="a painting of a cat", negative_prompt="blurry", width=32, height=32, steps=2,
                   num_images=2, seed=4)
    return he.EncryptedForm(**{**options, **overrides})


def _closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_encrypted_denoising_writes_images_and_returns_the_report(host, he_worker):
    flags = {name: p.requires_grad for name, p in host.model.named_parameters()}
    files, report, status = he.encrypted_sample(host, he_form())
    folder = host.outputs_dir(he.HE_FOLDER)
    assert len(files) == 2 and all(f.parent == folder for f in files) and folder.name == "privdiff-he", status
    assert status == f"2 image(s) in {folder}, seed 4; encrypted steps with both roles in this process"
    assert report.startswith("privdiff encrypted denoising: ddim, 2 steps, CFG 7.5") and "dense packing" in report
    assert "both roles in this process" in report and "worker (public context only)" in report
    assert "the offsets encrypted" in report and "noise: seed 4" in report
    assert (host.state.textinfo, host.state.sampling_step, host.state.sampling_steps) == (
        "privdiff: encrypted denoising", 2, 2)
    settings = json.loads(Image.open(files[0]).text["parameters"])
    assert settings["threshold"] == 0.01 and settings["worker"] == "this process"
    assert not {"prompt", "negative_prompt", "seed"} & set(settings)  # hidden from the worker: not in the file
    assert "a painting of a cat" not in json.dumps(Image.open(files[0]).text)
    assert {name: p.requires_grad for name, p in host.model.named_parameters()} == flags

    again, _, _ = he.encrypted_sample(host, he_form())  # the same seed: the same images, up to CKKS rounding
    assert [f.name for f in again] == ["privdiff_00002.png", "privdiff_00003.png"]
    diff = np.abs(_pixels(again[0]).astype(int) - _pixels(files[0]).astype(int))
    assert diff.max() <= 1

    secret, report, status = he.encrypted_sample(host, he_form(seed=-1))  # the default: secret noise
    assert "secret noise" in status and "not recorded" in report
    assert np.abs(_pixels(secret[0]).astype(int) - _pixels(files[0]).astype(int)).max() > 1

    remote = he_form(sampler="plms", packing="sparse", encrypt_offsets=False, worker=f" {he_worker} ",
                     num_images=1, save_prompt=True)
    files, report, status = he.encrypted_sample(host, remote)
    assert len(files) == 1 and status.endswith(f"encrypted steps with the worker at {he_worker}"), status
    assert f"worker at {he_worker}" in report and "sparse packing" in report and "the offsets in plaintext" in report
    settings = json.loads(Image.open(files[0]).text["parameters"])
    assert settings["worker"] == he_worker
    assert (settings["prompt"], settings["negative_prompt"], settings["seed"]) == ("a painting of a cat", "blurry", 4)


def test_encrypted_denoising_bad_input_is_one_line_and_writes_nothing(host):
    cases = [
        (he_form(threshold=1.0), "threshold must be in [0, 1), got 1.0"),
        (he_form(threshold=-0.1), "threshold must be in [0, 1)"),
        (he_form(threshold=float("nan")), "threshold must be a finite number"),
        (he_form(worker="nowhere"), "worker address 'nowhere' is not HOST:PORT"),
        (he_form(worker="127.0.0.1:70000"), "is not HOST:PORT"),
        (he_form(worker=f"127.0.0.1:{_closed_port()}"), "is unreachable"),
        (he_form(sampler="dpm"), "sampler='dpm'"),
        (he_form(packing="tight"), "packing='tight'"),
        (he_form(channels="all"), "channels='all'"),
        (he_form(steps=0), "steps must be between 1 and 1000"),
        (he_form(steps=2.5), "whole number"),
        (he_form(cfg=-1.0), "cfg must be a finite number >= 0"),
        (he_form(width=30), "must be multiples of 8"),
        (he_form(num_images=0), "batch size"),
        (he_form(seed=-2), "seed"),
    ]
    for bad, needle in cases:
        files, report, status = he.encrypted_sample(host, bad)
        assert files == [] and report == "" and status.startswith("privdiff: ") and "\n" not in status, status
        assert needle in status, status
    host.model = None
    assert "no checkpoint is loaded" in he.encrypted_sample(host, he_form())[2]
    host.forge = True
    assert he.encrypted_sample(host, he_form())[2] == common.FORGE_MESSAGE
    assert not any(host.outputs_dir(he.HE_FOLDER).iterdir())


def test_encrypted_denoising_interrupt_writes_nothing(host, he_worker):
    for worker in ("", he_worker):
        host.state.interrupted, host.interrupt_at = False, 1
        files, report, status = he.encrypted_sample(host, he_form(steps=3, worker=worker))
        assert (files, report) == ([], "") and status.startswith("privdiff: interrupted"), status
    assert not any(host.outputs_dir(he.HE_FOLDER).iterdir())


class _Component:
    """A stand-in gradio component or layout block: remembers its arguments and click handlers."""

    clicks: list = []

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def click(self, fn, inputs, outputs, **kwargs):
        _Component.clicks.append((self, fn, inputs, outputs, kwargs))

    change = click


def test_encrypted_tab_defaults_match_the_form_and_generate_runs_it(host, monkeypatch):
    from dataclasses import fields

    from extension import ui

    gradio = SimpleNamespace(__version__="3.41.2", update=dict, **{name: _Component for name in (
        "Blocks", "Tabs", "Tab", "Row", "Column", "Markdown", "Textbox", "Number", "Slider", "Radio", "Checkbox",
        "Dropdown", "Button", "HTML", "Gallery")})
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    monkeypatch.setattr(_Component, "clicks", [])
    ui.build(host, lambda fn, n_outputs: fn)
    ((_, run, inputs, outputs, js),) = [c for c in _Component.clicks if c[0].args == ("Generate",)]
    assert len(outputs) == 3 and "privdiff_he_status" in js["_js"]
    form = fields(he.EncryptedForm)
    assert [f.default for f in form[1:]] == [i.kwargs.get("value", "") for i in inputs[2:]]
    values = {f.name: i.kwargs.get("value", "") for f, i in zip(form, inputs[1:], strict=True)}
    gallery, report, status = run(None, *{**values, "width": 32, "height": 32, "steps": 1}.values())
    assert len(gallery) == 1 and "ddim, 1 steps" in report and "privdiff-ok" in status, status


class _HTTPException(Exception):
    def __init__(self, status_code, detail):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


@pytest.fixture
def api_routes(host, monkeypatch):
    """{(method, path): route function} of ``api.routes`` with stand-ins for FastAPI and A1111's modules."""
    from extension import api

    calls: list = []  # A1111's job begin/end, as shared.state.calls
    shared = SimpleNamespace(state=SimpleNamespace(calls=calls, begin=lambda job, **_: calls.append(job),
                                                   end=lambda: calls.append("end")))
    stubs = {"fastapi": SimpleNamespace(Body=lambda default: default, HTTPException=_HTTPException),
             "modules": SimpleNamespace(shared=shared), "modules.shared": shared,
             "modules.call_queue": SimpleNamespace(queue_lock=threading.Lock())}
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    app = SimpleNamespace(routes={})
    app.add_api_route = lambda path, fn, methods: app.routes.setdefault((methods[0], path), fn)
    api.routes(app, host)
    return app.routes


def test_api_he_sample_route(api_routes):
    """``POST /privdiff/v1/he-sample`` through ``api.routes``: a run inside A1111's job, a one-line refusal."""
    assert ("POST", "/privdiff/v1/he-sample") in api_routes and ("GET", "/privdiff/v1/report") in api_routes
    route = api_routes["POST", "/privdiff/v1/he-sample"]

    answer = route({"prompt": "a cat", "width": 32, "height": 32, "steps": 2, "seed": 1})
    assert answer["ok"] and len(answer["files"]) == 1 and Path(answer["files"][0]).is_absolute(), answer["status"]
    assert answer["report"].startswith("privdiff encrypted denoising")
    assert sys.modules["modules.shared"].state.calls == ["privdiff", "end"]
    answer = route({"prompt": "a cat", "threshold": 1.5})
    assert answer == {"ok": False, "files": [], "report": "",
                      "status": "privdiff: threshold must be in [0, 1), got 1.5"}
    with pytest.raises(_HTTPException) as refused:
        route({"prompt": "a cat", "key": "secret"})
    assert refused.value.status_code == 422
    answer = api_routes["POST", "/privdiff/v1/spectral-sample"]({"prior": "missing"})
    assert set(answer) == {"ok", "files", "status"} and not answer["ok"]


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/privdiff/v1/textual-inversion", {"images": "x", "name": "n", "epsilon": "four"}, "epsilon"),
    ("/privdiff/v1/textual-inversion", {"images": "x", "name": "n", "steps": "three"}, "steps"),
    ("/privdiff/v1/textual-inversion", {"images": "x", "name": "n", "steps": 2.5}, "steps"),
    ("/privdiff/v1/textual-inversion", {"images": "x", "name": "n", "delta": None}, "delta"),
    ("/privdiff/v1/textual-inversion", {"images": "x", "name": "n", "batch_size": True}, "batch_size"),
    ("/privdiff/v1/textual-inversion", {"images": ["x"], "name": "n"}, "images"),
    ("/privdiff/v1/textual-inversion", {"images": "x", "name": "n", "overwrite": "yes"}, "overwrite"),
    ("/privdiff/v1/textual-inversion", {"images": "x"}, "name"),
    ("/privdiff/v1/spectral-finetune", {"images": "x", "prior": "p", "name": "n", "learning_rate": [1]},
     "learning_rate"),
    ("/privdiff/v1/spectral-sample", {"prior": "p", "num_images": {"n": 1}}, "num_images"),
    ("/privdiff/v1/spectral-sample", {"prior": "p", "temperature": float("nan")}, "temperature"),
    ("/privdiff/v1/he-sample", {"prompt": "a cat", "cfg": "7"}, "cfg"),
    ("/privdiff/v1/he-sample", {"prompt": 3}, "prompt"),
    ("/privdiff/v1/audit", {"kind": "aggregate", "canaries": "many"}, "canaries"),
    ("/privdiff/v1/audit", {"kind": "aggregate", "confidence": None}, "confidence"),
    ("/privdiff/v1/audit", {"canaries": 8}, "kind"),
])
def test_api_refuses_a_wrongly_typed_field_in_one_line_naming_it(api_routes, host, path, body, field):
    with pytest.raises(_HTTPException) as refused:
        api_routes["POST", path](body)
    assert refused.value.status_code == 422 and f"'{field}'" in refused.value.detail
    assert "\n" not in refused.value.detail and refused.value.detail.startswith("privdiff: ")
    assert not _spent(host) and not any(host.embeddings_dir().iterdir())


def test_api_refuses_a_body_that_is_not_an_object(api_routes):
    with pytest.raises(_HTTPException) as refused:
        api_routes["POST", "/privdiff/v1/he-sample"](["a cat"])
    assert refused.value.status_code == 422 and "JSON object" in refused.value.detail


def test_api_accepts_whole_floats_for_whole_fields():
    form = forms.parse_form(he.EncryptedForm, {"prompt": "a cat", "steps": 3.0, "cfg": 7})
    assert (form.steps, type(form.steps), form.cfg, type(form.cfg)) == (3, int, 7.0, float)


def test_report_route_reads_only_names_inside_privdiffs_folders(api_routes, host, private, tmp_path):
    assert textual_inversion.train(host, form(private))[0]
    report = api_routes["GET", "/privdiff/v1/report"]
    assert "PRIVATE release" in report("dp_style.safetensors")["report"]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "big.safetensors").write_bytes((host.embeddings_dir() / "dp_style.safetensors").read_bytes())
    (host.embeddings_dir() / "link.safetensors").symlink_to(outside / "big.safetensors")
    (host.embeddings_dir() / "sub").mkdir()
    (host.embeddings_dir() / "sub" / "up").symlink_to(outside, target_is_directory=True)
    for name in (str(outside / "big.safetensors"), "../elsewhere/big.safetensors",
                 "sub/../../elsewhere/big.safetensors", "link.safetensors", "sub/up/big.safetensors",
                 "~/big.safetensors", ""):
        line = report(name)["report"]
        assert line.startswith("privdiff: ") and "\n" not in line and "PRIVATE" not in line, (name, line)
    (host.targets_dir() / "t.safetensors").write_bytes((host.embeddings_dir() / "dp_style.safetensors").read_bytes())
    assert "PRIVATE release" in report("t.safetensors")["report"]
    assert report("missing.safetensors")["report"].startswith("privdiff: file 'missing.safetensors' is in none of")


class _Recorded(_Component):
    """A stand-in gradio component that also remembers every instance built."""

    built: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _Recorded.built.append(self)


def _build_tab(host, monkeypatch):
    from extension import ui

    gradio = SimpleNamespace(__version__="3.41.2", update=dict, **{name: _Recorded for name in (
        "Blocks", "Tabs", "Tab", "Row", "Column", "Markdown", "Textbox", "Number", "Slider", "Radio", "Checkbox",
        "Dropdown", "Button", "HTML", "Gallery")})
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    monkeypatch.setattr(_Component, "clicks", [])
    monkeypatch.setattr(_Recorded, "built", [])
    ui.build(host, lambda fn, n_outputs: fn)
    return _Recorded.built


def test_every_labelled_field_of_every_subtab_has_its_own_label_and_id(host, monkeypatch):
    """A1111 saves ui-config.json values by ``privdiff/<label>``: a label used twice shares one saved value."""
    labelled = [c for c in _build_tab(host, monkeypatch) if "label" in c.kwargs]
    labels = [c.kwargs["label"] for c in labelled]
    ids = [c.kwargs.get("elem_id") for c in labelled]
    assert len(labelled) > 60 and None not in ids and all(i.startswith("privdiff_") for i in ids)
    assert sorted({x for x in labels if labels.count(x) > 1}) == [] and len(set(ids)) == len(ids)


def test_embedding_lists_refresh_with_files_written_after_start_up(host, monkeypatch, private):
    _build_tab(host, monkeypatch)
    refresh = {c[0].kwargs.get("elem_id"): c for c in _Component.clicks}
    for elem_id in ("privdiff_tools_refresh", "privdiff_reports_refresh"):
        button, fn, inputs, (dropdown,), _ = refresh[elem_id]
        assert button.args == ("\U0001f504",) and inputs == [] and dropdown.args == ([],)
    assert textual_inversion.train(host, form(private))[0]
    for elem_id in ("privdiff_tools_refresh", "privdiff_reports_refresh"):
        assert refresh[elem_id][1]() == {"choices": ["dp_style.safetensors"]}


def test_the_tab_names_what_install_could_not_provide(host, monkeypatch):
    from extension import install

    monkeypatch.setattr(install, "installed_versions", lambda: {**A1111_STACK, "opacus": "1.5.4"})
    notes = [c.args[0] for c in _build_tab(host, monkeypatch) if c.args and str(c.args[0]).startswith("**Unavail")]
    assert len(notes) == 1 and "opacus 1.5.4 is installed" in notes[0] and "tenseal>=0.3.14 is not" in notes[0]


def _per_image_files(folder):
    from privdiff.embeddings.files import Embedding, save_embedding

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        save_embedding(Embedding({"clip_l": 0.02 * torch.randn(1, 768, generator=g)}), folder / f"img{i}.safetensors")
    return folder


def _nothing_written(host):
    assert not any(host.embeddings_dir().iterdir()) and not host.default_ledger().exists() and host.reloads == 0
    assert not any(host.targets_dir().iterdir()) and not any(host.outputs_dir().iterdir())


@pytest.mark.parametrize("kind", ["ti-aggregate", "dpsgd-ti"])
def test_audit_of_textual_inversion_shows_the_bound_and_writes_nothing(host, private, kind):
    form = audit.AuditForm(kind=kind, images=str(private), epsilon=8.0, delta=1e-3, steps=1, batch_size=8,
                           resolution=32, canaries=4)
    text, status = audit.audit(host, form)
    assert status == text.splitlines()[0] and status.startswith("audited lower bound "), status
    assert status.endswith("not a release: nothing written, no ledger charged")
    result = json.loads(text.split("\n\n", 1)[1])
    assert result["kind"] == kind and result["canaries"] == 4 and result["claimed_epsilon"] <= 8.0 + 1e-9
    assert host.state.sampling_step == host.state.sampling_steps > 0
    _nothing_written(host)


def test_audit_of_the_other_releases(host, private, public_prior, tmp_path):
    files = _per_image_files(tmp_path / "per_image")
    runs = {
        "aggregate": audit.AuditForm(kind="aggregate", embeddings=str(files), one_image_per_file=True, epsilon=0.0,
                                     noise_multiplier=3.0, canaries=16),
        "guidance-target": audit.AuditForm(kind="guidance-target", images=str(private), image_encoder="tiny",
                                           epsilon=2.0, delta=1e-3, canaries=8),
        "wavelet-finetune": audit.AuditForm(kind="wavelet-finetune", images=str(private), prior="public",
                                            epsilon=8.0, delta=1e-3, sample_rate=0.5, steps=2, learning_rate=1e-3,
                                            canaries=8),
    }
    _with_public(host, public_prior)
    for kind, form in runs.items():
        text, status = audit.audit(host, form)
        assert status.startswith("audited lower bound "), (kind, status)
        result = json.loads(text.split("\n\n", 1)[1])
        assert result["kind"] == kind and result["epsilon_lower_bound"] <= result["claimed_epsilon"]
    assert json.loads(audit.audit(host, runs["aggregate"])[0].split("\n\n", 1)[1])["noise_multiplier"] == 3.0
    _nothing_written(host)


def test_audit_bad_input_is_one_line_and_runs_nothing(host, private, tmp_path):
    cases = [
        (audit.AuditForm(kind="magic"), "unknown kind 'magic'"),
        (audit.AuditForm(kind="ti-aggregate", images=str(private), canaries=1), "canaries must be between 2"),
        (audit.AuditForm(kind="ti-aggregate", images=str(private), confidence=float("nan")), "confidence"),
        (audit.AuditForm(kind="ti-aggregate", images=str(private), delta=0.5, resolution=32), "delta"),
        (audit.AuditForm(kind="aggregate", embeddings=str(_per_image_files(tmp_path / "e"))),
         "one_image_per_file"),
        (audit.AuditForm(kind="wavelet-finetune", images=str(private)), "pick a prior file"),
    ]
    for form, needle in cases:
        text, status = audit.audit(host, form)
        assert text == "" and status.startswith("privdiff: ") and "\n" not in status and needle in status, status
    host.forge = True
    assert audit.audit(host, audit.AuditForm(kind="dpsgd-ti", images=str(private)))[1] == common.FORGE_MESSAGE
    _nothing_written(host)


def test_audit_tab_defaults_match_the_form_and_the_kind_shows_its_fields(host, monkeypatch, tmp_path):
    from dataclasses import fields

    from extension.tabs import audit as tab

    built = _build_tab(host, monkeypatch)
    ((_, run, inputs, outputs, js),) = [c for c in _Component.clicks if c[0].args == ("Run audit",)]
    assert len(outputs) == 2 and "privdiff_audit_status" in js["_js"]
    form = fields(audit.AuditForm)
    assert inputs[1].kwargs["value"] == "ti-aggregate" and inputs[1].args == (list(audit.KINDS),)
    assert [f.default for f in form[1:]] == [i.kwargs.get("value", "") for i in inputs[2:]]
    values = {f.name: i.kwargs.get("value", "") for f, i in zip(form, inputs[1:], strict=True)}
    files = _per_image_files(tmp_path / "per_image")
    text, status = run(None, *{**values, "kind": "aggregate", "embeddings": str(files), "one_image_per_file": True,
                               "canaries": 8}.values())
    assert text.startswith("audited lower bound ") and "privdiff-ok" in status, status
    ((_, show, _, groups, _),) = [c for c in _Component.clicks
                                  if c[0].kwargs.get("elem_id") == "privdiff_audit_kind"]
    for chosen in audit.KINDS:
        visible = [update["visible"] for update in show(chosen)]
        assert visible == [chosen in kinds for kinds in tab.SHOWN.values()] and any(visible)
    assert len(groups) == len(tab.SHOWN) and all(g in built for g in groups)
    _nothing_written(host)


def test_api_audit_route(api_routes, host, tmp_path):
    route = api_routes["POST", "/privdiff/v1/audit"]
    files = _per_image_files(tmp_path / "per_image")
    answer = route({"kind": "aggregate", "embeddings": str(files), "one_image_per_file": True, "canaries": 8})
    assert answer["ok"] and set(answer) == {"ok", "result", "status"} and answer["result"].startswith("audited")
    assert sys.modules["modules.shared"].state.calls == ["privdiff", "end"]
    answer = route({"kind": "aggregate", "embeddings": str(files), "canaries": 8})
    assert not answer["ok"] and "one_image_per_file" in answer["status"]
    _nothing_written(host)
