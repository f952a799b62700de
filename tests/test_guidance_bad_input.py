"""The bad-input contract of `privdiff guidance target|sample|inspect` for file *contents* (issue 20).

Property tests feed generated hostile image-encoder folders (config.json / preprocessor_config.json / weights)
and hostile style-target files (report, encoder name, tensor) to ``privdiff.cli.main`` in-process: each must be
one line ``privdiff: error: ...`` naming the file, exit 2, no traceback, and nothing created or changed. The
regression tests below them cover the other breaks the issue lists for these commands.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from privdiff.cli import main as cli
from privdiff.demo.data import write_style_images
from privdiff.guidance.target import ENCODER_KEY, TENSOR, make_target, save_target, target_params
from privdiff.io import images
from privdiff.models.image_encoders import tiny_image_encoder
from privdiff.privacy.report import REPORT_KEY

PROFILE = settings(derandomize=True, deadline=None, database=None, max_examples=60,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_spec = importlib.util.spec_from_file_location("privdiff_cli_checks", Path(__file__).with_name("cli_checks.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
refused = _checks.refused


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Private images, a valid encoder folder (the tiny encoder saved), a valid target made with it, a FIFO."""
    root = tmp_path_factory.mktemp("ws")
    write_style_images(root / "images", count=6, size=32)
    encoder = tiny_image_encoder()
    encoder.model.save_pretrained(root / "encoder")
    target = make_target(encoder, torch.rand(6, 3, 32, 32), target_params(2.0, 1e-3, accountant="rdp",
                                                                          public_size=10), seed=0)
    save_target(target, root / "target.safetensors")
    os.mkfifo(root / "fifo")
    return root


@pytest.fixture
def no_model(monkeypatch):
    """Loading an SD model or embedding an image fails the test: the refusals must come before either."""
    import privdiff.guidance.target
    import privdiff.models.registry

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the bad input was refused")

    monkeypatch.setattr(privdiff.models.registry, "load_model", forbidden)
    monkeypatch.setattr(privdiff.guidance.target, "embed_in_batches", forbidden)


def target_args(ws: Path, encoder: object = "tiny") -> list:
    return ["guidance", "target", "--images", ws / "images", "--image-encoder", encoder, "--out",
            ws / "new.safetensors", "--epsilon", "2", "--delta", "1e-3", "--accountant", "rdp", "--public-size", "10"]


def sample_args(ws: Path, target: object, encoder: object = "tiny") -> list:
    return ["guidance", "sample", "--model", "tiny", "--target", target, "--image-encoder", encoder, "--prompt", "x",
            "--out", ws / "new-samples", "--steps", "1", "--recurrence", "1"]


# ---------------------------------------------------------------- hostile encoder folders

NUMBERS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
           "projection_dim"]
NOT_A_SIZE = st.one_of(st.sampled_from([0, -1, 2**31, 10**30, True, None, 1.5, "32", "", [], {}, [32]]),
                       st.integers(max_value=0), st.text(max_size=5))
NOT_NORMALISATION = st.one_of(st.sampled_from(["abc", 0.5, None, [], [0.5], [1, 2, 3, 4], [[1], [2], [3]],
                                               ["1", "2", "3"], [True, 1, 1], [0, 0, 0], [1e9, 1, 1]]),
                              st.lists(st.floats(allow_nan=False), min_size=4, max_size=5))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=8)


@st.composite
def hostile_encoder(draw) -> tuple[str, object]:
    """(file to replace, its hostile content: text, or "fifo"/"folder" for a non-regular file)."""
    kind = draw(st.sampled_from(["size", "heads", "patch", "type", "garbage", "deep", "nan", "big", "normalise",
                                 "special", "vision_config"]))
    if kind == "garbage":  # any JSON but an object naming a CLIP vision model
        return "config.json", json.dumps(draw(JSON.filter(lambda v: not isinstance(v, dict) or "model_type" not in v)))
    if kind == "deep":
        depth = draw(st.integers(33, 100_000))
        return draw(st.sampled_from(["config.json", "preprocessor_config.json"])), "[" * depth + "]" * depth
    if kind == "nan":
        constant = draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        file = draw(st.sampled_from(["config.json", "preprocessor_config.json"]))
        return file, f'{{"model_type": "clip_vision_model", "hidden_size": {constant}, "image_mean": [{constant}]}}'
    if kind == "big":
        return "config.json", " " * (1 << 20) + "{}"
    if kind == "special":
        return draw(st.sampled_from(["config.json", "preprocessor_config.json", "model.safetensors"])), \
            draw(st.sampled_from(["fifo", "folder"]))
    if kind == "normalise":
        key = draw(st.sampled_from(["image_mean", "image_std"]))
        return "preprocessor_config.json", json.dumps({key: draw(NOT_NORMALISATION)})
    config = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "projection_dim": 16}
    if kind == "size":
        config[draw(st.sampled_from(NUMBERS))] = draw(NOT_A_SIZE)
    elif kind == "heads":
        config["num_attention_heads"] = draw(st.sampled_from([3, 5, 7, 31]))
    elif kind == "patch":
        config["patch_size"] = draw(st.integers(33, 4096))
    elif kind == "type":
        config["model_type"] = draw(st.one_of(st.text(max_size=12), st.none(), st.integers()).filter(
            lambda t: t not in ("clip_vision_model", "clip")))
    else:
        config = {"model_type": "clip", "vision_config": draw(st.one_of(JSON.filter(lambda v: not isinstance(v, dict)),
                                                                        st.just({"hidden_size": 0})))}
    return "config.json", json.dumps(config)


def _encoder_folder(ws: Path, name: str, content: object) -> Path:
    folder = Path(tempfile.mkdtemp(dir=ws, prefix="enc-"))
    shutil.copy(ws / "encoder" / "model.safetensors", folder / "model.safetensors")
    shutil.copy(ws / "encoder" / "config.json", folder / "config.json")
    path = folder / name
    path.unlink(missing_ok=True)
    if content == "fifo":
        os.mkfifo(path)
    elif content == "folder":
        path.mkdir()
    else:
        path.write_text(content)
    return folder


@PROFILE
@given(case=hostile_encoder(), command=st.sampled_from(["target", "sample"]))
def test_hostile_encoder_folders_are_refused_naming_the_folder(ws, capsys, no_model, case, command):
    folder = _encoder_folder(ws, *case)
    try:
        args = target_args(ws, folder) if command == "target" else sample_args(ws, ws / "target.safetensors", folder)
        refused(capsys, ws, args, folder.name)
    finally:
        shutil.rmtree(folder)


# ---------------------------------------------------------------- hostile target files

BAD_FIELDS = {
    "epsilon": [float("nan"), float("inf"), 0, -1, "2", True, None, [1]],
    "noise_multiplier": [float("nan"), float("-inf"), 0, -0.5, "1", False, {}],
    "clip_norm": [float("nan"), 0, -1, "1"],
    "delta": [float("nan"), 0, 1, 2, -1e-5, "1e-5", None],
    "sample_rate": [float("nan"), 0, 1.5, -1, "1"],
    "steps": [0, -3, 1.5, "1", None, True],
    "public_size": [0, -10, 10.5, "10", None],
    "private": ["yes", 1, None],
    "release_id": [5, None, []],
    "world_size": [0, -2, 1.5, "2", None, True],
}


@st.composite
def hostile_target(draw, valid: tuple[torch.Tensor, dict]) -> tuple[dict, dict]:
    """(tensors, metadata) of a file that is no valid style target."""
    vector, metadata = valid
    tensors, metadata = {TENSOR: vector.clone()}, dict(metadata)
    report = json.loads(metadata[REPORT_KEY])
    kind = draw(st.sampled_from(["field", "missing", "report-text", "encoder", "tensor"]))
    if kind == "field":
        name = draw(st.sampled_from(sorted(BAD_FIELDS)))
        value = draw(st.sampled_from(BAD_FIELDS[name]))
        metadata[REPORT_KEY] = json.dumps({**report, name: value}).replace("Infinity", draw(st.sampled_from(
            ["Infinity", "1e400"])))
    elif kind == "missing":
        report.pop(draw(st.sampled_from(sorted(set(report) - {"world_size"}))))  # absent: a one-process report
        metadata[REPORT_KEY] = json.dumps(report)
    elif kind == "report-text":
        depth = draw(st.integers(33, 50_000))
        metadata[REPORT_KEY] = draw(st.one_of(st.text(max_size=30), st.just("[" * depth + "]" * depth),
                                              JSON.filter(lambda v: not isinstance(v, dict)).map(json.dumps)))
    elif kind == "encoder":
        bad = draw(st.one_of(st.just(None), st.just("x" * 201), st.text(min_size=1, max_size=20).map(
            lambda t: t + "\x1b[2J"), st.sampled_from(["\n", "a\rb", "\x00"])))
        if bad is None:
            metadata.pop(ENCODER_KEY)
        else:
            metadata[ENCODER_KEY] = bad
    else:
        change = draw(st.sampled_from(["nan", "zero", "2d", "extra", "renamed", "empty"]))
        if change == "nan":
            tensors[TENSOR][draw(st.integers(0, len(vector) - 1))] = float(draw(st.sampled_from(["nan", "inf"])))
        elif change == "zero":
            tensors[TENSOR] = torch.zeros_like(vector)
        elif change == "2d":
            tensors[TENSOR] = vector.view(4, -1).clone()
        elif change == "extra":
            tensors["other"] = torch.zeros(2)
        elif change == "renamed":
            tensors = {"vector": vector.clone()}
        else:
            tensors[TENSOR] = torch.zeros(0)
    return tensors, metadata


def _valid_target(ws: Path) -> tuple[torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(ws / "target.safetensors"), framework="pt") as f:
        return f.get_tensor(TENSOR), f.metadata()


@PROFILE
@given(data=st.data(), command=st.sampled_from(["inspect", "sample"]))
def test_hostile_target_files_are_refused_naming_the_file(ws, capsys, no_model, data, command):
    tensors, metadata = data.draw(hostile_target(_valid_target(ws)), label="target")
    bad = Path(tempfile.mkdtemp(dir=ws, prefix="target-")) / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    try:
        args = ["guidance", "inspect", bad] if command == "inspect" else sample_args(ws, bad)
        refused(capsys, ws, args, str(bad))
    finally:
        shutil.rmtree(bad.parent)


# ---------------------------------------------------------------- the other breaks, one test each


def test_non_regular_files_are_refused_by_kind(ws, capsys, no_model):
    fifo = ws / "fifo"
    refused(capsys, ws, ["guidance", "inspect", fifo], "is a FIFO")
    refused(capsys, ws, sample_args(ws, fifo), "is a FIFO")
    refused(capsys, ws, target_args(ws, f"RN50:{fifo}"), "is a FIFO")
    refused(capsys, ws, target_args(ws, fifo), "is a FIFO")
    big = ws / "big.safetensors"
    with open(big, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: a target file this large is refused before it is read
    try:
        refused(capsys, ws, ["guidance", "inspect", big], "more than a target's")
    finally:
        big.unlink()


@pytest.mark.parametrize("spec, word", [(":", "':'"), ("RN50:", "names no file"), (":model.pt", "architecture")])
def test_open_clip_specs_with_an_empty_part_are_named(ws, capsys, no_model, spec, word):
    line = refused(capsys, ws, target_args(ws, spec), word)
    assert "image encoder" in line


def test_guidance_weight_zero_turns_guidance_off():
    args = cli.build_parser().parse_args([*map(str, sample_args(Path("."), "t.safetensors")), "--guidance-weight", "0"])
    assert args.guidance_weight == 0.0


def test_sample_sizes_that_cannot_fit_are_refused_before_the_model_loads(ws, capsys, no_model, monkeypatch):
    monkeypatch.setattr(images, "half_memory", lambda: 2**30)
    line = refused(capsys, ws, [*sample_args(ws, ws / "target.safetensors"), "--num-images", "64", "--height", "4096",
                                "--width", "4096"], "64 image(s) of 4096x4096", "at most 1 image(s)")
    assert "MiB" in line


def test_sample_sizes_are_refused_with_the_models_decoder_counted(ws, capsys, monkeypatch):
    monkeypatch.setattr(images, "half_memory", lambda: 2**20)  # 32 px with the tiny decoder need 2 MiB each
    refused(capsys, ws, [*sample_args(ws, ws / "target.safetensors"), "--num-images", "2"], "not one image")


def test_sample_output_folder_is_checked_but_not_created(ws, capsys, no_model):
    inside_a_file = ws / "images" / "private_000.png" / "x"
    refused(capsys, ws, [*sample_args(ws, ws / "target.safetensors"), "--out", inside_a_file], "is not a folder")
    refused(capsys, ws, sample_args(ws, ws / "missing.safetensors"), "missing.safetensors")


def test_skipped_entries_warning_does_not_precede_an_error(ws, capsys, caplog, no_model):
    (ws / "images" / "notes.txt").write_text("not an image")
    try:
        with caplog.at_level(logging.WARNING, logger="privdiff"):
            refused(capsys, ws, [*target_args(ws), "--delta", "0.5"], "delta")
        assert "skipped" not in caplog.text  # the error is the only line
    finally:
        (ws / "images" / "notes.txt").unlink()


def test_public_size_obeys_the_delta_rule(ws, capsys, no_model):
    refused(capsys, ws, [*target_args(ws), "--public-size", "1000"], "public_size")


def test_a_release_that_would_be_noise_warns_before_the_work(ws, capsys, caplog, monkeypatch):
    import privdiff.release.artifact
    from privdiff.errors import PrivdiffError

    seen = []

    def release_artifact(*args, **kwargs):  # the charge and the work start here
        seen.append(caplog.text)
        raise PrivdiffError("stopped before the work")

    monkeypatch.setattr(privdiff.release.artifact, "release_artifact", release_artifact)
    with caplog.at_level(logging.WARNING, logger="privdiff"):
        assert cli.main([str(a) for a in [*target_args(ws), "--sample-rate", "1e-9"]]) == 2
    assert len(seen) == 1 and "mostly noise" in seen[0] and "sigma*C/(q*n) = " in seen[0]
