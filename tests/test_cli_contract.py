"""Regression tests for the CLI contract, one per break a hostile-user run found.

Bad input gets ONE line ``privdiff: error: ...`` on stderr naming the file or value, exit code 2, and no
file is created or changed; everything checkable before a model loads is checked before it loads.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from privdiff.cli import main as cli
from privdiff.demo.data import write_style_images
from privdiff.embeddings import files
from privdiff.embeddings.files import Embedding, load_embedding, save_embedding
from privdiff.release import output_plan

VALID = ["--model", "tiny", "--epsilon", "2", "--delta", "1e-3", "--steps", "1"]


# The contract's checks, shared with the other bad-input tests (loaded by path: tests/ is not a package).
_spec = importlib.util.spec_from_file_location("privdiff_cli_checks", Path(__file__).with_name("cli_checks.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
refused = _checks.refused


@pytest.fixture
def images(tmp_path):
    return write_style_images(tmp_path / "private", count=3, size=32)


@pytest.fixture
def sd1_file(tmp_path):
    return save_embedding(Embedding({"clip_l": torch.randn(2, 768)}), tmp_path / "src.safetensors")


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusals under test must come before it."""
    import privdiff.models.registry

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(privdiff.models.registry, "load_model", load_model)


# ---------------------------------------------------------------- output: filesystem


def test_read_only_output_folder(tmp_path, sd1_file, images, capsys, monkeypatch, no_model):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(output_plan.tempfile, "mkstemp", read_only)
    refused(capsys, tmp_path, ["embedding", "convert", sd1_file, tmp_path / "out.safetensors"],
            f"output folder {tmp_path} is not writable: Read-only file system")
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.pt", *VALID],
            "Read-only file system")


def test_full_output_folder(tmp_path, sd1_file, images, capsys, monkeypatch, no_model):
    monkeypatch.setattr(output_plan.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    refused(capsys, tmp_path, ["embedding", "convert", sd1_file, tmp_path / "out.pt"], "4096 bytes free")
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.pt", *VALID],
            "bytes free")


def test_disk_full_while_writing_names_the_file(tmp_path, sd1_file, capsys, monkeypatch):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"the user's file")

    def full(tensors, metadata, tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_safetensors", full)
    refused(capsys, tmp_path, ["embedding", "convert", sd1_file, target, "--force"],
            f"cannot write {target}: No space left on device")


def test_output_that_is_a_directory_is_refused_even_with_force(tmp_path, sd1_file, images, capsys, no_model):
    (tmp_path / "dir.safetensors").mkdir()
    for out in (tmp_path / "dir.safetensors", tmp_path):
        refused(capsys, tmp_path, ["embedding", "convert", sd1_file, out, "--force"], str(out), "is a directory")
        refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", out, "--force", *VALID],
                "is a directory")


# ---------------------------------------------------------------- device and resolution


UNAVAILABLE = [] if torch.cuda.is_available() else ["cuda", "cuda:0"]


@pytest.mark.parametrize("device", ["banana", "cuda:x", "meta", "", f"cuda:{torch.cuda.device_count() + 8}",
                                    *UNAVAILABLE])
def test_unknown_or_unavailable_device(tmp_path, images, capsys, no_model, device):
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors",
                               "--device", device, *VALID], "argument --device", repr(device))


@pytest.mark.parametrize(("value", "needle"), [("0", "too small"), ("7", "too small"), ("4097", "too large"),
                                               ("100000000", "too large"), ("64.5", "whole number"),
                                               ("-32", "too small")])
def test_resolution_is_bounded_and_zero_is_not_the_default(tmp_path, images, capsys, no_model, value, needle):
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors",
                               f"--resolution={value}", *VALID], "argument --resolution", needle)


# ---------------------------------------------------------------- embedding convert: tokens


@pytest.mark.parametrize(("out", "extra", "needle"), [
    ("d.safetensors", ["--format", "diffusers", "--token", ""], "token ''"),
    ("d.safetensors", ["--format", "diffusers", "--token", "two words"], "token 'two words'"),
    ("d.safetensors", ["--format", "diffusers", "--token", "tab\tbed"], "without spaces"),
    ("a.pt", ["--token", "new\nline"], "without spaces"),
    ("my concept.safetensors", ["--format", "diffusers"], "from the file name"),
    ("s.safetensors", ["--token", "cat"], "only a1111-pt and diffusers files store a token"),
    ("s.safetensors", ["--format", "safetensors", "--token", "cat"], "store a token"),
])
def test_convert_refuses_tokens_the_format_cannot_hold(tmp_path, sd1_file, capsys, out, extra, needle):
    refused(capsys, tmp_path, ["embedding", "convert", sd1_file, tmp_path / out, *extra], needle)


def test_convert_stores_a_valid_token_and_takes_the_format_from_the_extension(tmp_path, sd1_file, capsys):
    assert cli.main(["embedding", "convert", str(sd1_file), str(tmp_path / "c.safetensors"), "--format",
                     "diffusers", "--token", "<cat>"]) == 0
    assert load_embedding(tmp_path / "c.safetensors").token == "<cat>"
    assert cli.main(["embedding", "convert", str(sd1_file), str(tmp_path / "p.pt")]) == 0
    assert '"format": "a1111-pt"' in capsys.readouterr().out
    assert load_embedding(tmp_path / "p.pt").token == "p"


# ---------------------------------------------------------------- numeric options


@pytest.mark.parametrize(("flag", "value", "rule"), [
    ("--clip-norm", "1e300", "> 0 and <= 10000"),
    ("--clip-norm", "0", "> 0 and <= 10000"),
    ("--lr", "inf", "> 0 and <= 10"),
    ("--lr", "nan", "> 0 and <= 10"),
    ("--lr", "-inf", "> 0 and <= 10"),
    ("--lr", "11", "> 0 and <= 10"),
    ("--steps", "0", "from 1 to 1000000"),
    ("--steps", "1000001", "from 1 to 1000000"),
    ("--batch-size", "4097", "from 1 to 4096"),
    ("--vectors", "76", "from 1 to 75"),
    ("--epsilon", "inf", "finite number > 0"),
    ("--delta", "1", "> 0 and < 1"),
    ("--sample-rate", "nan", "> 0 and <= 1"),
    ("--budget-epsilon", "-1", "finite number > 0"),
    ("--reproducible-seed", "-1", "from 0 to"),
])
def test_numbers_are_finite_and_in_range_at_parse_time(tmp_path, images, capsys, no_model, flag, value, rule):
    line = refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors",
                                      *VALID, f"{flag}={value}"])
    assert line.startswith(f"privdiff: error: argument {flag}: must be ") and rule in line and value in line


def test_the_example_message_of_the_brief(tmp_path, images, capsys, no_model):
    line = refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors",
                                      *VALID, "--lr", "inf"])
    assert line == "privdiff: error: argument --lr: must be a finite number > 0 and <= 10, got inf"


def test_too_many_vectors_blame_the_model_before_images_are_decoded(tmp_path, images, capsys, monkeypatch):
    import privdiff.io.images

    def no_decoding(*args, **kwargs):
        raise AssertionError("images were decoded before --vectors was checked")

    monkeypatch.setattr(privdiff.io.images.PrivateFiles, "load", no_decoding)
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors",
                               *VALID, "--vectors", "70"], "vectors 70 is too many for this model",
            "at most 66 vectors")


def test_a_corrupt_image_is_found_before_any_model_loads(tmp_path, images, capsys, no_model):
    (images / "zz_corrupt.png").write_bytes(b"\x89PNG not really")
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors", *VALID],
            "zz_corrupt.png")


# ---------------------------------------------------------------- output problems found before training


def test_output_problems_are_found_before_any_model_loads(tmp_path, images, capsys, no_model):
    common = ["ti-aggregate", "--images", images, *VALID]
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "o.safetensors", "--format", "a1111-pt"],
            "must end in .pt")
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "o.pt", "--format", "safetensors"],
            "must end in .safetensors")
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "o.ckpt"], "unsupported extension '.ckpt'")
    (tmp_path / "r.pt.privacy.json").write_text("{}")
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "r.pt"], "r.pt.privacy.json already exists")
    (tmp_path / "s.pt").write_bytes(b"the user's embedding")
    (tmp_path / "s.pt.privacy.json").mkdir()
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "s.pt", "--force"],
            "s.pt.privacy.json (the report sidecar of s.pt) is a directory")
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "s.pt"], "s.pt already exists")
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "missing" / "o.pt"], "does not exist")
    refused(capsys, tmp_path, [*common, "--out", tmp_path / "o.safetensors", "--token", "cat"], "store a token")


def test_output_name_too_long_for_the_temporaries_is_refused_first(tmp_path, sd1_file, images, capsys, no_model):
    out = tmp_path / ("n" * 240 + ".safetensors")  # fits, but its temporary (20 characters more) would not
    refused(capsys, tmp_path, ["embedding", "convert", sd1_file, out], "name is too long")
    refused(capsys, tmp_path, ["ti-aggregate", "--images", images, "--out", out, *VALID], "name is too long")


def test_model_and_init_word_are_checked_at_parse_time(tmp_path, images, capsys, no_model):
    common = ["ti-aggregate", "--images", images, "--out", tmp_path / "o.safetensors", *VALID]
    (tmp_path / "notes.txt").write_text("not a model")
    for model in (tmp_path / "missing", tmp_path / "notes.txt", ""):
        refused(capsys, tmp_path, [*common, "--model", model], "argument --model", "not found")
    for word in ("", "   ", "tab\there"):
        refused(capsys, tmp_path, [*common, f"--init-word={word}"], "argument --init-word")


def test_convert_onto_a_pt_whose_sidecar_is_a_directory_keeps_the_pt(tmp_path, sd1_file, capsys):
    (tmp_path / "x.pt").write_bytes(b"the user's embedding")
    (tmp_path / "x.pt.privacy.json").mkdir()
    refused(capsys, tmp_path, ["embedding", "convert", sd1_file, tmp_path / "x.pt", "--force"], "is a directory")


# ---------------------------------------------------------------- stderr: one line, argparse included


@pytest.mark.parametrize("args", [
    [],
    ["--bogus"],
    ["ti-aggregate"],
    ["ti-aggregate", "--model", "tiny", "--images", "x", "--out", "o.safetensors", "--epsilon", "1"],
    ["privacy"],
    ["privacy", "sigma", "--epsilon", "1"],
    ["privacy", "epsilon", "--noise-multiplier", "x", "--sample-rate", "0.1", "--steps", "1", "--delta", "1e-5"],
    ["embedding", "convert", "only-one-path"],
    ["embedding", "convert", "a", "b", "--format", "ckpt"],
    ["aggregate", "--embeddings"],
])
def test_usage_errors_are_one_line(tmp_path, capsys, args):
    refused(capsys, tmp_path, args)


def test_no_torchvision_notice_before_the_error(tmp_path):
    """A fresh process: transformers prints its "requires torchvision" notice once per process."""
    proc = subprocess.run(
        [sys.executable, "-m", "privdiff.cli", "ti-aggregate", "--model", "tiny", "--images", str(tmp_path / "none"),
         "--out", str(tmp_path / "o.safetensors"), *VALID],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert len(lines) == 1 and lines[0].startswith("privdiff: error: ") and "none" in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_library_checks_directly(sdxl_backend):
    from privdiff.embeddings.textual_inversion import TIConfig, check_config, initial_vectors
    from privdiff.errors import PrivdiffError
    from privdiff.io.devices import check_device

    assert check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu") and check_device("cpu") == "cpu"
    for name in ("banana", "cuda:-1", "meta", f"cuda:{torch.cuda.device_count()}"):
        with pytest.raises(PrivdiffError, match="device"):
            check_device(name)
    check_config(sdxl_backend, TIConfig(n_vectors=66))  # 77 - BOS - EOS - the longest style template (9 tokens)
    for config in (TIConfig(n_vectors=67), TIConfig(n_vectors=69, templates="object")):
        with pytest.raises(PrivdiffError, match="too many for this model"):
            initial_vectors(sdxl_backend, config)
    with pytest.raises(PrivdiffError, match="invalid learning rate"):
        TIConfig(lr=float("inf"))
