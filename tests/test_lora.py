"""DP-LoRA: adapters, their per-sample gradients, and the kohya file every loader reads."""

from __future__ import annotations

import json

import pytest
import torch
from opacus import GradSampleModule
from safetensors import safe_open

from privdiff.errors import PrivdiffError
from privdiff.lora.adapters import attach, detach
from privdiff.lora.files import kohya_state, save_lora
from privdiff.lora.training import LoRAConfig, pass_rows, per_sample_gradients, plan_dp_lora, run_dp_lora
from privdiff.models.diffusers_backend import DiffusersBackend
from privdiff.models.tiny import tiny_pipeline
from privdiff.models.training import noise_prediction_loss
from privdiff.privacy.accountants import epsilon_for
from privdiff.privacy.report import PrivacyReport
from privdiff.release.artifact import carries_release
from privdiff.release.dp_params import DPParams


@pytest.fixture
def backend():
    backend = DiffusersBackend(tiny_pipeline("sd1"))
    backend.freeze()
    return backend


def _adapted(backend, targets="attn", rank=2, alpha=4.0):
    adapters = attach(backend.pipe.unet, rank, alpha, targets, torch.Generator().manual_seed(0))
    with torch.no_grad():  # a trained-looking update (up starts at zero)
        for adapter in adapters.values():
            adapter.up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return adapters


def _predict(backend, seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    with torch.no_grad():
        return backend.predict_noise(x, torch.tensor([10, 600]), backend.encode_text(["a cat", "a dog"]))


def test_adapters_start_as_the_base_unet_and_come_off_again(backend):
    before = _predict(backend)
    adapters = attach(backend.pipe.unet, 4, 4.0, "attn-ff", torch.Generator().manual_seed(0))
    assert all(name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0", ".ff.net.0.proj", ".ff.net.2"))
               for name in adapters)
    trainable = [n for n, p in backend.pipe.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".down." in n or ".up." in n for n in trainable)
    assert torch.equal(_predict(backend), before)  # up starts at zero
    detach(backend.pipe.unet, adapters)
    assert not any(p.requires_grad for p in backend.pipe.unet.parameters())


def test_bad_adapter_settings_are_refused(backend):
    for rank, alpha, targets, message in [(0, 1.0, "attn", "rank must be"), (2, -1.0, "attn", "alpha must be"),
                                          (2, 1.0, "conv", "targets='conv'")]:
        with pytest.raises(PrivdiffError, match=message):
            attach(backend.pipe.unet, rank, alpha, targets, torch.Generator())


def test_per_sample_gradients_equal_a_per_example_loop(backend):
    adapters = _adapted(backend)
    params = [p for a in adapters.values() for p in (a.down.weight, a.up.weight)]
    hooked = GradSampleModule(backend.pipe.unet, loss_reduction="sum")
    gen = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 500, 999])
    cond = backend.encode_text(["a picture"])
    per_sample_gradients(backend, params, 2, x0, t, noise, cond)  # microbatches of 2, the last one padded
    got = [p.grad_sample.clone() for p in params]
    assert all(g.shape == (3, *p.shape) for g, p in zip(got, params, strict=True))
    hooked.remove_hooks()
    for i in range(3):
        loss = noise_prediction_loss(backend, x0[i:i + 1], t[i:i + 1], noise[i:i + 1], cond).sum()
        for g, want in zip(got, torch.autograd.grad(loss, params), strict=True):
            torch.testing.assert_close(g[i], want, rtol=1e-4, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in got)


def test_a_pass_holds_a_public_number_of_rows_bounded_by_the_batch_size():
    """The expected batch on a CPU, a quarter of it (a power of two) on a GPU; never more than batch_size."""
    config = LoRAConfig(batch_size=16)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [pass_rows(config, expected, cpu) for expected in (1, 10, 16, 64)] == [1, 10, 16, 16]
    assert [pass_rows(config, expected, cuda) for expected in (1, 10, 16, 64)] == [1, 4, 4, 16]


def test_the_file_holds_what_every_loader_applies(backend, tmp_path):
    """kohya keys and shapes, and base weight + (alpha / rank) up @ down reproduces the adapted UNet."""
    adapters = _adapted(backend, rank=2, alpha=4.0)
    adapted = _predict(backend)
    report = plan_dp_lora(DPParams(epsilon=1.0, delta=1e-5), 10, LoRAConfig())
    path = save_lora(tmp_path / "style.safetensors", adapters, "SD1", report)
    detach(backend.pipe.unet, adapters)
    with safe_open(str(path), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert state.keys() == kohya_state(adapters).keys() and all(k.startswith("lora_unet_") for k in state)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == ("2", "4", "sd_v1")
    assert PrivacyReport.from_metadata(meta) == report and "lora_adapter_metadata" not in meta
    assert carries_release(path, report.release_id)
    modules = dict(backend.pipe.unet.named_modules())
    with torch.no_grad():
        for name in adapters:
            stem = "lora_unet_" + name.replace(".", "_")
            down, up = state[f"{stem}.lora_down.weight"], state[f"{stem}.lora_up.weight"]
            assert down.shape[0] == 2 and up.shape[1] == 2
            modules[name].weight += float(state[f"{stem}.alpha"]) / down.shape[0] * up @ down
    torch.testing.assert_close(_predict(backend), adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(PrivdiffError, match="already exists"):
        save_lora(path, adapters, "SD1", None)


def test_diffusers_load_lora_weights_applies_the_file_as_trained(backend, tmp_path):
    """diffusers (with peft) reads the kohya file and its alphas: the pipeline then predicts as the adapted UNet."""
    adapters = _adapted(backend, rank=2, alpha=4.0)
    adapted = _predict(backend)
    save_lora(tmp_path / "style.safetensors", adapters, "SD1", None)
    detach(backend.pipe.unet, adapters)
    base = _predict(backend)
    assert not torch.allclose(base, adapted, atol=1e-4)
    backend.pipe.load_lora_weights(str(tmp_path), weight_name="style.safetensors")
    torch.testing.assert_close(_predict(backend), adapted, rtol=1e-4, atol=1e-5)


def test_a_release_trains_the_adapters_and_reports_the_accountants_epsilon(backend):
    images = torch.rand(12, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    params = DPParams(epsilon=8.0, delta=1e-5, sample_rate=0.5, clip_norm=1.0)
    config = LoRAConfig(rank=2, alpha=2.0, steps=3, lr=1e-2, batch_size=4, prompt="a picture")
    planned = plan_dp_lora(params, len(images), config)  # calibrated: sigma's epsilon is at most the target's
    assert 0.99 * 8.0 <= epsilon_for(planned.noise_multiplier, 0.5, 3, 1e-5)[1] <= planned.epsilon == 8.0
    given = plan_dp_lora(DPParams(epsilon=None, delta=1e-5, sample_rate=0.5, noise_multiplier=2.0), 12, config)
    assert given.epsilon == epsilon_for(2.0, 0.5, 3, 1e-5)[1] and given.steps == 3
    before = _predict(backend)
    calls = []
    adapters, report = run_dp_lora(backend, images, params, config, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)] and report.noise_multiplier == planned.noise_multiplier
    assert any(float(a.up.weight.detach().abs().max()) > 0 for a in adapters.values())  # trained
    assert not torch.equal(_predict(backend), before)
    assert all(getattr(p, "grad_sample", None) is None and getattr(p, "summed_grad", None) is None
               for a in adapters.values() for p in a.parameters())
    with pytest.raises(PrivdiffError, match="bound 'normalize' is not available"):
        plan_dp_lora(DPParams(epsilon=1.0, delta=1e-5, bound="normalize"), 12, config)


def test_the_command_writes_the_lora_file_and_nothing_else(tmp_path, capsys):
    from privdiff.cli.main import main
    from privdiff.demo.data import write_style_images

    images = write_style_images(tmp_path / "private", count=6, size=32)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = ["lora", "--model", "tiny", "--images", str(images), "--out", str(out_dir / "style.safetensors"),
            "--epsilon", "4", "--delta", "1e-3", "--steps", "2", "--batch-size", "4", "--rank", "2",
            "--accountant", "rdp", "--dataset-label", "unit"]
    assert main(args) == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["epsilon"] == 4.0 and summary["steps"] == 2 and summary["sample_rate"] == pytest.approx(4 / 6)
    assert summary["relation"] == "add-remove (N public)" and summary["dataset_label"] == "unit"
    assert [p.name for p in out_dir.iterdir()] == ["style.safetensors"]
    with safe_open(str(out_dir / "style.safetensors"), "pt") as f:
        assert PrivacyReport.from_metadata(f.metadata()).release_id == summary["release_id"]
        assert all(k.startswith("lora_unet_") for k in f.keys())  # noqa: SIM118
    assert main(args) == 2  # an existing output is refused before any work
    assert "already exists" in capsys.readouterr().err
    assert main([*args[:6], str(out_dir / "style.pt"), *args[7:]]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_sdxl_adapters_train_and_say_so_in_the_file(tmp_path):
    backend = DiffusersBackend(tiny_pipeline("sdxl"))
    backend.freeze()
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    params = DPParams(epsilon=8.0, delta=1e-3, sample_rate=1.0, clip_norm=1.0, accountant="rdp")
    adapters, report = run_dp_lora(backend, images, params, LoRAConfig(rank=2, steps=1, batch_size=2))
    path = save_lora(tmp_path / "xl.safetensors", adapters, backend.family, report)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
        assert any("attn2_to_k.lora_down" in k for k in f.keys())  # noqa: SIM118
