"""The bad-input contract of ``privdiff wavelet``: hostile tokenizer and prior contents (property tests), FIFOs,
sizes that cannot fit, outputs that cannot be written, and nothing created on a refused run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from privdiff.cli import main as cli
from privdiff.demo.data import write_style_images
from privdiff.io.images import load_image_folder
from privdiff.wavelet import prior as prior_module
from privdiff.wavelet.prior import PriorConfig, SpectralPrior, save_prior
from privdiff.wavelet.tokenizer import fit_tokenizer
from privdiff.wavelet.training import TrainConfig, pretrain

_spec = importlib.util.spec_from_file_location("privdiff_cli_checks", Path(__file__).with_name("cli_checks.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
refused = _checks.refused

PROFILE = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A valid tokenizer and public prior (16 px, 3 scales, width 8), public and private images, a FIFO."""
    root = tmp_path_factory.mktemp("wavelet-ws")
    write_style_images(root / "public", count=6, size=16, seed=1)
    write_style_images(root / "private", count=4, size=16, seed=2)
    images = load_image_folder(root / "public", 16)[1]
    tokenizer = fit_tokenizer(images, size=16, base=4, codebook_size=8, iterations=2)
    tokenizer.save(root / "tok.safetensors")
    model = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=8, layers=1, heads=1))
    pretrain(model, tokenizer.encode(images), TrainConfig(steps=1, batch_size=2))
    save_prior(model, tokenizer, root / "prior.safetensors")
    os.mkfifo(root / "fifo.safetensors")
    (root / "adir.safetensors").mkdir()
    return root


@pytest.fixture
def deadline():
    """Fail (rather than hang) a test whose command blocks, e.g. on a FIFO."""
    def expire(*_):
        raise TimeoutError("the command blocked")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in list(f.keys())}, dict(f.metadata())


def _uses(ws: Path, kind: str, bad: Path) -> list[list]:
    """The commands that read a ``kind`` file ("prior" or "tokenizer"), given ``bad``; none may create anything."""
    if kind == "tokenizer":
        return [["wavelet", "pretrain", "--tokenizer", bad, "--images", ws / "public", "--out", ws / "new.safetensors",
                 "--steps", "1", "--dim", "8", "--layers", "1", "--heads", "1", "--checkpoint-dir", ws / "ck"]]
    return [["wavelet", "inspect", bad],
            ["wavelet", "sample", "--prior", bad, "--num-images", "1", "--out", ws / "samples"],
            ["wavelet", "finetune", "--prior", bad, "--images", ws / "private", "--out", ws / "dp.safetensors",
             "--epsilon", "10", "--delta", "1e-3", "--steps", "1", "--checkpoint-dir", ws / "ck"]]


# ---------------------------------------------------------------- hostile contents (property tests)

HOSTILE_JSON = st.sampled_from([0, -1, 1e9, 2**70, True, None, "8", [], {}, [8], 4096, 0.5, "NaN"])
HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "0", "-4", "3", "1e3", "99999999999", "[" * 5000 + "]" * 5000, '{"a": NaN}',
                     "NaN", "\x00", "２"]),
)


def _not(original: str):
    """Text that does not mean ``original`` (a whole number written with leading zeros would)."""
    return lambda text: not (text.isascii() and text.isdigit() and int(text) == int(original))


@st.composite
def hostile_prior(draw, tensors: dict, metadata: dict) -> bytes:
    """The bytes of a prior file that differs from the valid one in one hostile way."""
    tensors, metadata = dict(tensors), dict(metadata)
    config = json.loads(metadata["config"])
    kind = draw(st.sampled_from(["drop-record", "record", "config-field", "config-json", "shape-claim",
                                 "vocab", "drop-tensor", "extra-tensor", "reshape", "non-finite", "dtype",
                                 "truncate", "report", "identity"]))
    if kind == "drop-record":
        del metadata[draw(st.sampled_from(["privdiff_kind", "config", "tokenizer", "size", "base"]))]
    elif kind == "record":
        key = draw(st.sampled_from(["size", "base"]))
        metadata[key] = draw(HOSTILE_TEXT.filter(_not(metadata[key])))
    elif kind == "config-field":
        field = draw(st.sampled_from(sorted(config)))
        config[field] = draw(HOSTILE_JSON.filter(lambda v: v != config[field] and v != list(config[field])
                                                 if field == "vocab_sizes" else v != config[field]))
        metadata["config"] = json.dumps(config)
    elif kind == "config-json":
        metadata["config"] = draw(st.sampled_from(["[" * 100 + "]" * 100, "{", '{"dim": NaN}', "null", "[]",
                                                   json.dumps({**config, "extra": 1})]))
    elif kind == "shape-claim":  # a small file whose config claims a big model
        config.update(dim=draw(st.sampled_from([4096, 2048])), layers=draw(st.sampled_from([16, 64])), heads=8)
        metadata["config"] = json.dumps(config)
    elif kind == "vocab":  # the tokenizer record disagrees with the codebooks
        k = draw(st.integers(0, len(config["vocab_sizes"]) - 1))
        config["vocab_sizes"][k] += draw(st.sampled_from([-1, 1, 1000]))
        metadata["config"] = json.dumps(config)
    elif kind == "drop-tensor":
        del tensors[draw(st.sampled_from(sorted(tensors)))]
    elif kind == "extra-tensor":
        tensors[draw(st.sampled_from(["prior.extra", "tokenizer.codebook_9", "x"]))] = torch.zeros(2)
    elif kind == "reshape":
        name = draw(st.sampled_from(sorted(tensors)))
        tensors[name] = torch.zeros(tensors[name].numel() + 1)
    elif kind == "non-finite":
        name = draw(st.sampled_from(sorted(tensors)))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    elif kind == "dtype":
        name = draw(st.sampled_from(sorted(tensors)))
        tensors[name] = tensors[name].to(draw(st.sampled_from([torch.int32, torch.int64, torch.uint8])))
    elif kind == "report":
        metadata["privdiff.privacy_report"] = draw(st.sampled_from(
            ['{"epsilon": NaN}', "[" * 200 + "]" * 200, "null", "{}", '{"epsilon": 1e999}', "x"]))
    elif kind == "identity":
        metadata["tokenizer"] = draw(st.sampled_from(["0" * 16, "", "x" * 100]))
    data = safetensors_bytes(tensors, metadata)
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    return data


@st.composite
def hostile_tokenizer(draw, tensors: dict, metadata: dict) -> bytes:
    """The bytes of a tokenizer file that differs from the valid one in one hostile way."""
    tensors, metadata = dict(tensors), dict(metadata)
    kind = draw(st.sampled_from(["fewer", "more", "record", "drop-record", "shape", "non-finite", "identity",
                                 "truncate", "header"]))
    if kind == "fewer":  # fewer codebooks than scales
        del tensors[f"codebook_{draw(st.integers(0, len(tensors) - 1))}"]
    elif kind == "more":
        tensors[f"codebook_{len(tensors)}"] = torch.zeros(8, 144)
    elif kind == "record":
        key = draw(st.sampled_from(["size", "base"]))
        metadata[key] = draw(HOSTILE_TEXT.filter(_not(metadata[key])))
    elif kind == "drop-record":
        del metadata[draw(st.sampled_from(["privdiff_kind", "size", "base", "identity"]))]
    elif kind == "shape":
        name = draw(st.sampled_from(sorted(tensors)))
        rows = draw(st.sampled_from([0, 70000]))
        tensors[name] = torch.zeros(rows, tensors[name].shape[1]) if rows else torch.zeros(3, 5)
    elif kind == "non-finite":
        name = draw(st.sampled_from(sorted(tensors)))
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float("nan")
    elif kind == "identity":
        metadata["identity"] = "0" * 16
    data = safetensors_bytes(tensors, metadata)
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "header":  # a header length or header JSON of its own
        header = draw(st.sampled_from([b"[" * 100000, b'{"a": {"dtype": "F32", "shape": [2147483647, 2147483647], '
                                       b'"data_offsets": [0, 4]}}', b"{}", b"null"]))
        length = draw(st.sampled_from([len(header), 2**63, 2**40]))
        data = length.to_bytes(8, "little") + header + b"\0" * 4
    return data


def _check_hostile(ws: Path, capsys, kind: str, data: bytes) -> None:
    folder = Path(tempfile.mkdtemp(dir=ws, prefix="case-"))
    bad = folder / f"bad-{kind}.safetensors"
    bad.write_bytes(data)
    try:
        for args in _uses(ws, kind, bad):
            refused(capsys, ws, args, "bad-")
    finally:
        shutil.rmtree(folder)


@pytest.fixture(scope="module")
def prior_contents(ws):
    return _contents(ws / "prior.safetensors")


@pytest.fixture(scope="module")
def tokenizer_contents(ws):
    return _contents(ws / "tok.safetensors")


@PROFILE
@given(data=st.data())
def test_hostile_prior_files_are_refused_in_one_line(ws, capsys, monkeypatch, prior_contents, data):
    """Every command that reads a prior: one line naming it, nothing created, no model built from the claims."""
    built = []
    monkeypatch.setattr(prior_module.SpectralPrior, "__init__",
                        lambda self, config: built.append(config) or pytest.fail(f"built {config}"))
    _check_hostile(ws, capsys, "prior", data.draw(hostile_prior(*prior_contents)))
    assert not built


@PROFILE
@given(data=st.data())
def test_hostile_tokenizer_files_are_refused_in_one_line(ws, capsys, tokenizer_contents, data):
    _check_hostile(ws, capsys, "tokenizer", data.draw(hostile_tokenizer(*tokenizer_contents)))


def test_valid_files_pass_the_same_checks(ws, capsys):
    """The baselines of the property tests are accepted (so their refusals are the hostile parts')."""
    assert cli.main(["wavelet", "inspect", str(ws / "prior.safetensors")]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["dim"] == 8


def test_state_shapes_and_weight_count_match_the_model():
    config = PriorConfig((16, 8, 4), 4, dim=16, layers=3, heads=2)
    model = SpectralPrior(config)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == config.state_shapes()
    assert config.weight_count() == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- kinds, sizes, outputs


def test_fifos_and_folders_are_refused_by_kind(ws, capsys, deadline):
    for path, word in ((ws / "fifo.safetensors", "FIFO"), (ws / "adir.safetensors", "folder")):
        for kind in ("prior", "tokenizer"):
            for args in _uses(ws, kind, path):
                refused(capsys, ws, args, word)


def test_a_model_too_big_for_memory_is_refused_saying_what_fits(ws, capsys):
    line = refused(capsys, ws, ["wavelet", "pretrain", "--tokenizer", ws / "tok.safetensors", "--images",
                                ws / "public", "--out", ws / "new.safetensors", "--dim", "4096", "--layers", "64",
                                "--heads", "64", "--checkpoint-dir", ws / "ck"], "MiB", "layers fit")
    assert "width 4096 x 64 layers" in line


def test_sample_creates_nothing_until_every_input_is_checked(ws, capsys):
    """A bad refine model or upscaler is refused before any image is made or the output folder created."""
    not_a_model = ws / "not-a-model"
    not_a_model.mkdir(exist_ok=True)
    base = ["wavelet", "sample", "--prior", ws / "prior.safetensors", "--num-images", "2", "--out", ws / "samples"]
    refused(capsys, ws, [*base, "--refine-model", not_a_model], "not-a-model")
    refused(capsys, ws, [*base, "--upscaler", ws / "missing.pth"], "missing.pth")
    refused(capsys, ws, [*base[:-1], ws / "prior.safetensors" / "x"], "not a folder")


def test_unwritable_outputs_are_refused_before_work(ws, capsys, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the output was checked")

    monkeypatch.setattr("privdiff.wavelet.workflow.finetune", no_training)
    monkeypatch.setattr("privdiff.wavelet.workflow.pretrain", no_training)
    finetune = ["wavelet", "finetune", "--prior", ws / "prior.safetensors", "--images", ws / "private", "--epsilon",
                "10", "--delta", "1e-3", "--steps", "1", "--checkpoint-dir", ws / "ck", "--ledger", ws / "l.json"]
    pretrain_args = ["wavelet", "pretrain", "--tokenizer", ws / "tok.safetensors", "--images", ws / "public",
                     "--steps", "1", "--dim", "8", "--layers", "1", "--heads", "1", "--checkpoint-dir", ws / "ck"]
    for command in (finetune, pretrain_args):
        refused(capsys, ws, [*command, "--out", ws / "adir.safetensors", "--force"], "is a directory")
        if Path("/proc").is_dir():
            line = refused(capsys, ws, [*command, "--out", "/proc/dp.safetensors"], "/proc")
            assert ".tmp" not in line
    refused(capsys, ws, [*finetune, "--out", ws / "dp.safetensors", "--checkpoint-dir", ws / "tok.safetensors"],
            "not a folder")


def test_a_new_checkpoint_folder_waits_for_the_images(ws, capsys):
    """An image damaged past its header is named when decoded; the new checkpoint folder is not created."""
    folder = ws / "damaged"
    shutil.copytree(ws / "private", folder)
    victim = sorted(folder.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # the header stays readable, the pixels are gone
    try:
        refused(capsys, ws, ["wavelet", "finetune", "--prior", ws / "prior.safetensors", "--images", folder,
                             "--out", ws / "dp.safetensors", "--epsilon", "10", "--delta", "1e-3", "--steps", "1",
                             "--checkpoint-dir", ws / "new-ck"], victim.name)
    finally:
        shutil.rmtree(folder)


def test_a_failed_write_names_the_output_and_the_checkpoint_that_resumes_it(ws, capsys, monkeypatch, tmp_path):
    import privdiff.wavelet.tokenizer as tokenizer_module

    def disk_full(tensors, filename, metadata=None):
        raise OSError(28, "No space left on device", filename)

    args = ["wavelet", "finetune", "--prior", str(ws / "prior.safetensors"), "--images", str(ws / "private"),
            "--out", str(tmp_path / "dp.safetensors"), "--epsilon", "10", "--delta", "1e-3", "--steps", "2",
            "--batch-size", "2", "--checkpoint-dir", str(tmp_path / "ck")]
    with monkeypatch.context() as patch:
        patch.setattr(tokenizer_module, "save_file", disk_full)
        assert cli.main(args) == 2
    (line,) = [text for text in capsys.readouterr().err.splitlines() if "error" in text]  # progress bars aside
    assert f"cannot write {tmp_path / 'dp.safetensors'}: No space left" in line and ".tmp" not in line
    assert "private checkpoint" in line and not (tmp_path / "dp.safetensors").exists()
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["resumed"] is True
    assert list((tmp_path / "ck").iterdir()) == []


def test_nan_probabilities_are_one_line(ws):
    from privdiff.errors import PrivdiffError
    from privdiff.wavelet.prior import load_prior

    loaded = load_prior(ws / "prior.safetensors")
    with torch.no_grad():
        loaded.prior.head.weight.fill_(3e38)
        loaded.prior.head.bias.fill_(3e38)
    with pytest.raises(PrivdiffError, match="non-finite probabilities"):
        loaded.prior.sample(1, torch.Generator().manual_seed(0))

