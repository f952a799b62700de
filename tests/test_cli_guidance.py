"""`privdiff guidance target|sample|inspect`: files, reports, ledger composition, one-line errors."""

import json

import pytest
from PIL import Image

from privdiff.cli.main import main
from privdiff.demo.data import write_style_images

TARGET = ["--image-encoder", "tiny", "--epsilon", "2", "--delta", "1e-3", "--public-size", "10",
          "--accountant", "rdp"]


@pytest.fixture
def images(tmp_path):
    return write_style_images(tmp_path / "private", count=6, size=32)


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("privdiff: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_target_then_guided_samples(tmp_path, images, capsys):
    target = tmp_path / "style.safetensors"
    code, out, err = run(capsys, "guidance", "target", "--images", images, "--out", target, *TARGET,
                         "--dataset-label", "unit")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["relation"] == "add-remove" and summary["bound"] == "normalize" and summary["clip_norm"] == 1.0
    assert summary["image_encoder"].startswith("CLIP vision 16-d")
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["style.safetensors"]
    code, out, err = run(capsys, "guidance", "inspect", target)
    assert code == 0 and json.loads(out)["privacy_report"]["release_id"] == summary["release_id"]
    out_dir = tmp_path / "samples"
    args = ["guidance", "sample", "--model", "tiny", "--target", target, "--image-encoder", "tiny", "--prompt",
            "a painting", "--out", out_dir, "--steps", "3", "--recurrence", "2", "--num-images", "2"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    written = json.loads(out)["images"]
    assert len(written) == 2 and all(Image.open(p).size == (32, 32) for p in written)
    assert json.loads(Image.open(written[0]).text["parameters"])["target_release_id"] == summary["release_id"]
    code, out, err = run(capsys, *args)  # a second run numbers on, never overwrites
    assert code == 0 and len(list(out_dir.glob("*.png"))) == 4


def test_target_and_embedding_releases_compose_in_one_ledger(tmp_path, images, capsys):
    ledger = tmp_path / "owner" / "ledger.json"
    ledger.parent.mkdir()
    budget = ["--ledger", ledger, "--budget-epsilon", "2.5", "--budget-delta", "1e-3"]
    code, _, err = run(capsys, "ti-aggregate", "--model", "tiny", "--images", images, "--out",
                       tmp_path / "e.safetensors", "--steps", "1", "--epsilon", "2", "--delta", "1e-3",
                       "--public-size", "10", "--accountant", "rdp", *budget)
    assert code == 0, err
    first = json.loads(run(capsys, "ledger", "show", "--ledger", ledger)[1])["largest_image_spend"]["epsilon"]
    code, _, err = run(capsys, "guidance", "target", "--images", images, "--out", tmp_path / "t.safetensors",
                       *TARGET, *budget)
    assert code == 2 and "budget" in error(err)  # 2 + 2 composed is over 2.5 for these images
    assert not (tmp_path / "t.safetensors").exists()
    code, out, err = run(capsys, "guidance", "target", "--images", images, "--out", tmp_path / "t.safetensors",
                         *TARGET[:3], "0.5", *TARGET[4:], *budget)
    assert code == 0, err
    code, out, _ = run(capsys, "ledger", "show", "--ledger", ledger)
    shown = json.loads(out)
    assert len(shown["releases"]) == 2 and shown["largest_image_spend"]["epsilon"] > first


@pytest.mark.parametrize("extra, match", [
    (["--epsilon", "nan"], "epsilon"),
    (["--delta", "0.5"], "delta"),
    (["--image-encoder", "/nonexistent/encoder"], "/nonexistent/encoder"),
])
def test_target_bad_input_is_one_line_and_writes_nothing(tmp_path, images, capsys, extra, match):
    out = tmp_path / "t.safetensors"
    code, _, err = run(capsys, "guidance", "target", "--images", images, "--out", out, *TARGET, *extra)
    assert code == 2 and match in error(err)
    assert not out.exists()


def test_empty_and_corrupt_folders_and_wrong_encoder(tmp_path, images, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run(capsys, "guidance", "target", "--images", empty, "--out", tmp_path / "t.safetensors", *TARGET)
    assert code == 2 and str(empty) in error(err)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    code, _, err = run(capsys, "guidance", "target", "--images", images, "--out", tmp_path / "t.safetensors", *TARGET)
    assert code == 2 and "broken.png" in error(err)
    (images / "broken.png").unlink()
    target = tmp_path / "t.safetensors"
    assert run(capsys, "guidance", "target", "--images", images, "--out", target, *TARGET)[0] == 0
    folder = tmp_path / "other-encoder"
    from privdiff.models.image_encoders import tiny_image_encoder

    tiny_image_encoder(seed=1).model.save_pretrained(folder)
    code, _, err = run(capsys, "guidance", "sample", "--model", "tiny", "--target", target, "--image-encoder",
                       folder, "--prompt", "x", "--out", tmp_path / "s", "--steps", "1")
    line = error(err)
    assert code == 2 and "CLIP vision 16-d" in line and str(folder) in line and str(target) in line


def test_bad_encoders_and_targets_are_named(tmp_path, images, capsys):
    import torch
    from safetensors.torch import save_file

    out = tmp_path / "t.safetensors"
    not_clip = tmp_path / "not_clip"
    not_clip.mkdir()
    (not_clip / "config.json").write_text('{"model_type": "bert"}')
    weights = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(2)}, str(weights))
    for encoder, match in ((not_clip, "not a CLIP vision model"), (weights, "is a file"),
                           (f"RN50:{weights}", "open_clip")):
        code, _, err = run(capsys, "guidance", "target", "--images", images, "--out", out,
                           *TARGET[:1], encoder, *TARGET[2:])
        line = error(err)
        assert code == 2 and match in line and str(weights if encoder != not_clip else not_clip) in line, line
        assert not out.exists()
    assert run(capsys, "guidance", "target", "--images", images, "--out", out, *TARGET)[0] == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        metadata, vector = f.metadata(), f.get_tensor("target")
    vector[0] = float("nan")
    save_file({"target": vector}, str(tmp_path / "nan.safetensors"), metadata=metadata)
    code, _, err = run(capsys, "guidance", "inspect", tmp_path / "nan.safetensors")
    assert code == 2 and "nan.safetensors" in error(err) and "non-finite" in error(err)
