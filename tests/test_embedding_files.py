"""Embedding files: every layout ComfyUI/A1111/diffusers read, round trips, conversion, bad input."""

from __future__ import annotations

import json
import pickletools
import re
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from privdiff.cli import main as cli
from privdiff.embeddings import files
from privdiff.embeddings.files import (
    Embedding,
    convert_embedding,
    inspect_embedding,
    load_embedding,
    save_embedding,
)
from privdiff.errors import PrivdiffError

REPORT_KEY = "privdiff.privacy_report"
WIDTHS = {"SD1": {"clip_l": 768}, "SD2": {"clip_h": 1024}, "SDXL": {"clip_l": 768, "clip_g": 1280}}
SUFFIX = {"safetensors": ".safetensors", "a1111-pt": ".pt", "diffusers": ".safetensors"}


def report_metadata() -> dict[str, str]:
    """A privacy report as privdiff.privacy.report writes it into safetensors headers."""
    from privdiff.privacy.report import REPORT_KEY as KEY
    from privdiff.privacy.report import PrivacyReport

    assert KEY == REPORT_KEY
    report = PrivacyReport.from_json(json.dumps({  # a privdiff 0.1 report, which every later version reads
        "mechanism": "test", "epsilon": 1.5, "delta": 1e-5, "noise_multiplier": 1.2, "sample_rate": 0.5,
        "clip_norm": 1.0, "steps": 1, "accountant": "prv", "dataset_size": 20, "library_version": "0.1.0",
        "release_id": "0" * 32, "dataset_label": "pets", "private": True,
        "notes": ["dataset size N is treated as public"], "created": "2024-01-01T00:00:00+00:00",
    }))
    return report.to_metadata()


def make(family: str, n: int = 3, seed: int = 0, metadata: dict[str, str] | None = None) -> Embedding:
    g = torch.Generator().manual_seed(seed)
    vectors = {k: torch.randn(n, w, generator=g) for k, w in WIDTHS[family].items()}
    return Embedding(vectors, None, dict(report_metadata() if metadata is None else metadata))


def same(a: Embedding, b: Embedding) -> bool:
    keys = a.vectors.keys()
    return keys == b.vectors.keys() and all(torch.equal(a.vectors[k], b.vectors[k]) for k in keys)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def assert_one_line_error(exc: pytest.ExceptionInfo, name: str) -> None:
    msg = str(exc.value)
    assert name in msg and "\n" not in msg, msg


# ---------------------------------------------------------------- round trips and conversion

@pytest.mark.parametrize(
    ("family", "fmt"),
    [(f, m) for f in ("SD1", "SD2") for m in files.FORMATS] + [("SDXL", "safetensors")],
)
def test_round_trip(tmp_path, family, fmt):
    emb = make(family)
    path = save_embedding(emb, tmp_path / f"my-concept{SUFFIX[fmt]}", fmt=fmt)
    back = load_embedding(path)
    assert same(back, emb)
    assert back.family == family and back.n_vectors == 3
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in back.vectors.values())
    assert back.metadata == emb.metadata
    assert back.token == (None if fmt == "safetensors" else "my-concept")
    info = inspect_embedding(path)
    assert info["token"] == "my-concept" and info["family"] == family and info["vectors_per_token"] == 3
    json.dumps(info)


def test_standard_layouts_on_disk(tmp_path):
    sd1 = save_embedding(make("SD1"), tmp_path / "a.safetensors")
    assert list(load_file(sd1)) == ["emb_params"]
    xl = save_embedding(make("SDXL", n=2), tmp_path / "x.safetensors")
    assert {k: list(v.shape) for k, v in load_file(xl).items()} == {"clip_l": [2, 768], "clip_g": [2, 1280]}
    diff = save_embedding(make("SD1"), tmp_path / "d.safetensors", fmt="diffusers", token="<tok>")
    assert list(load_file(diff)) == ["<tok>"]
    pt = save_embedding(make("SD1"), tmp_path / "p.pt", fmt="a1111-pt", token="tok")
    data = torch.load(pt, weights_only=True)
    assert data["string_to_token"] == {"*": 265} and data["name"] == "tok"
    assert {"step", "sd_checkpoint", "sd_checkpoint_name"} <= data.keys()
    assert data["privdiff_privacy_report"] == report_metadata()[REPORT_KEY]
    assert json.loads((tmp_path / "p.pt.privacy.json").read_text())["epsilon"] == 1.5


def test_a1111_pt_passes_a1111_pickle_check_and_mmap(tmp_path):
    """A1111's modules/safe.py allows only these zip members and pickle globals."""
    path = save_embedding(make("SD1"), tmp_path / "p.pt", fmt="a1111-pt")
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pickle_bytes = next(z.read(n) for n in names if n.endswith("/data.pkl"))
    assert all(re.fullmatch(r"[^/]+/(data/\d+|version|data\.pkl)", n) for n in names), names
    allowed = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}
    found = {arg for op, arg, _ in pickletools.genops(pickle_bytes) if op.name == "GLOBAL"}
    assert found <= allowed, found
    data = torch.load(path, weights_only=True, mmap=True)  # diffusers loads zip pickles with mmap
    assert torch.equal(data["string_to_param"]["*"], make("SD1").vectors["clip_l"])


def test_reads_external_layouts(tmp_path):
    t = torch.randn(2, 768)
    cases = {
        "diffusers.bin": ({"<cat-toy>": t}, "diffusers-bin", "<cat-toy>"),
        "old.pt": ({"emb_params": t}, "pt/emb_params", None),
        "bare.bin": (t, "pt/tensor", None),
        "a1111.pt": ({"string_to_token": {"*": 265}, "string_to_param": {"*": t}, "name": "cat",
                      "step": 500, "sd_checkpoint": "abc", "sd_checkpoint_name": "v1-5"}, "a1111-pt", "cat"),
        "xl.pt": ({"clip_l": t, "clip_g": torch.randn(2, 1280)}, "pt/sdxl", None),
    }
    for name, (obj, fmt, token) in cases.items():
        torch.save(obj, tmp_path / name)
        info = inspect_embedding(tmp_path / name)
        assert info["format"] == fmt and info["vectors_per_token"] == 2, name
        emb = load_embedding(tmp_path / name)
        assert emb.token == token and torch.equal(emb.vectors["clip_l"], t), name
    torch.save({"emb_params": t}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_embedding(tmp_path / "legacy.pt").vectors["clip_l"], t)


def test_single_vector_half_precision_and_any_key(tmp_path):
    v = torch.randn(1024).to(torch.bfloat16)
    save_file({"whatever": v}, tmp_path / "one.safetensors")
    emb = load_embedding(tmp_path / "one.safetensors")
    assert emb.family == "SD2" and emb.token == "whatever"
    assert emb.vectors["clip_h"].dtype == torch.float32 and emb.vectors["clip_h"].shape == (1, 1024)
    assert torch.equal(emb.vectors["clip_h"][0], v.float())
    info = inspect_embedding(tmp_path / "one.safetensors")
    assert info["tensors"] == {"whatever": [1024]} and info["format"] == "diffusers"
    xl = {"clip_l": torch.randn(4, 768).half(), "clip_g": torch.randn(4, 1280).half()}
    save_file(xl, tmp_path / "x.safetensors")
    assert inspect_embedding(tmp_path / "x.safetensors")["format"] == "safetensors/sdxl"


def test_convert_chain_keeps_vectors_and_metadata(tmp_path):
    report = report_metadata()
    emb = make("SD1", metadata={**report, "note": "kept"})
    first = save_embedding(emb, tmp_path / "a.safetensors")
    pt = convert_embedding(first, tmp_path / "b.pt", fmt="a1111-pt")
    diff = convert_embedding(pt, tmp_path / "c.safetensors", fmt="diffusers", token="<c>")
    last = convert_embedding(diff, tmp_path / "d.safetensors")
    assert same(load_embedding(last), emb)
    assert load_embedding(pt).metadata == report  # a .pt keeps only the report
    assert load_embedding(diff).token == "<c>" and load_embedding(pt).token == "b"
    assert load_embedding(last).metadata == report
    diffusers_copy = convert_embedding(first, tmp_path / "e.safetensors", "diffusers")
    assert load_embedding(diffusers_copy).metadata == emb.metadata


def test_convert_sdxl_and_refusals(tmp_path):
    src = save_embedding(make("SDXL"), tmp_path / "xl.safetensors")
    out = convert_embedding(src, tmp_path / "xl2.safetensors")
    assert same(load_embedding(out), make("SDXL"))
    for fmt, dst in (("a1111-pt", "xl.pt"), ("diffusers", "xl3.safetensors")):
        with pytest.raises(PrivdiffError, match="two load_textual_inversion calls") as exc:
            convert_embedding(src, tmp_path / dst, fmt=fmt)
        assert_one_line_error(exc, dst)
    with pytest.raises(PrivdiffError, match="must end in .safetensors"):
        save_embedding(make("SD1"), tmp_path / "x.pt")
    with pytest.raises(PrivdiffError, match="unknown embedding format"):
        save_embedding(make("SD1"), tmp_path / "x.safetensors", fmt="ckpt")
    assert listing(tmp_path) == ["xl.safetensors", "xl2.safetensors"]


# ---------------------------------------------------------------- overwrite and atomicity

def test_refuses_overwrite_without_force(tmp_path):
    path = save_embedding(make("SD1", seed=1), tmp_path / "e.safetensors")
    with pytest.raises(PrivdiffError, match="already exists") as exc:
        save_embedding(make("SD1", seed=2), path)
    assert_one_line_error(exc, "e.safetensors")
    assert same(load_embedding(path), make("SD1", seed=1))
    save_embedding(make("SD1", seed=2), path, force=True)
    assert same(load_embedding(path), make("SD1", seed=2))


def test_a1111_sidecar_overwrite_rules(tmp_path):
    (tmp_path / "e.pt.privacy.json").write_text("{}")
    with pytest.raises(PrivdiffError, match="privacy.json already exists"):
        save_embedding(make("SD1"), tmp_path / "e.pt", fmt="a1111-pt")
    assert listing(tmp_path) == ["e.pt.privacy.json"]
    save_embedding(make("SD1"), tmp_path / "e.pt", fmt="a1111-pt", force=True)
    assert json.loads((tmp_path / "e.pt.privacy.json").read_text())["epsilon"] == 1.5
    save_embedding(make("SD1", metadata={"x": "y"}), tmp_path / "e.pt", fmt="a1111-pt", force=True)
    assert listing(tmp_path) == ["e.pt"]  # a stale report must not describe the new file


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import errno

    def broken(tensors, metadata, tmp):
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files, "write_safetensors", broken)
    with pytest.raises(PrivdiffError, match="No space left on device") as exc:
        save_embedding(make("SD1"), tmp_path / "e.safetensors")
    assert_one_line_error(exc, "e.safetensors")
    assert listing(tmp_path) == []


def test_failed_sidecar_write_leaves_nothing(tmp_path, monkeypatch):
    from pathlib import Path as _Path

    real = _Path.write_text

    def broken(self, *args, **kwargs):
        if ".privacy.json." in self.name:
            raise OSError(28, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_Path, "write_text", broken)
    with pytest.raises(PrivdiffError, match="e.pt.privacy.json: No space left on device"):
        save_embedding(make("SD1"), tmp_path / "e.pt", fmt="a1111-pt")
    assert listing(tmp_path) == []


def test_failed_rename_puts_back_the_replaced_files(tmp_path, monkeypatch):
    """--force onto e.pt and its sidecar: a failure after the .pt was replaced restores both old files."""
    import os

    from privdiff.io import atomic

    old = save_embedding(make("SD1", seed=1, metadata={}), tmp_path / "e.pt", fmt="a1111-pt")
    (tmp_path / "e.pt.privacy.json").write_text("old report")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real, calls = os.replace, []

    def failing_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(30, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_second)
    with pytest.raises(PrivdiffError, match="Read-only file system"):
        save_embedding(make("SD1", seed=2), old, fmt="a1111-pt", force=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_output_plan_refuses_before_writing(tmp_path):
    from privdiff.release.output_plan import plan_output

    (tmp_path / "d.safetensors").mkdir()
    (tmp_path / "s.pt.privacy.json").mkdir()
    (tmp_path / "x.pt.privacy.json").write_text("{}")
    for args, needle in [
        ((tmp_path / "d.safetensors",), "is a directory"),
        ((tmp_path / "d.safetensors", "safetensors", None, True), "is a directory"),
        ((tmp_path / "s.pt", None, None, True), "s.pt.privacy.json (the report sidecar of s.pt) is a directory"),
        ((tmp_path / "x.pt",), "x.pt.privacy.json already exists"),
        ((tmp_path / "e.pt", "safetensors"), "must end in .safetensors"),
        ((tmp_path / "e.safetensors", "a1111-pt"), "must end in .pt"),
        ((tmp_path / "e.txt",), "unsupported extension"),
        ((tmp_path / "e.safetensors", None, "tok"), "only a1111-pt and diffusers files store a token"),
        ((tmp_path / "e.safetensors", "diffusers", "two words"), "without spaces"),
        ((tmp_path / "e.safetensors", "diffusers", ""), "without spaces"),
        ((tmp_path / "my concept.pt",), "from the file name"),
        ((tmp_path / "no" / "e.pt",), "does not exist"),
    ]:
        with pytest.raises(PrivdiffError, match=re.escape(needle)) as exc:
            plan_output(*args)
        assert "\n" not in str(exc.value)
    plan = plan_output(tmp_path / "x.pt", token="<x>", force=True)
    assert (plan.fmt, plan.token, plan.sidecar) == ("a1111-pt", "<x>", tmp_path / "x.pt.privacy.json")
    assert plan_output(tmp_path / "e.safetensors", token="e").token is None  # the stem is what loaders use
    assert listing(tmp_path) == ["d.safetensors", "s.pt.privacy.json", "x.pt.privacy.json"]


# ---------------------------------------------------------------- bad input

def _valid_safetensors(path: Path) -> None:
    save_file({"emb_params": torch.randn(2, 768)}, path)


def _truncated(path: Path) -> None:
    _valid_safetensors(path)
    path.write_bytes(path.read_bytes()[:-100])


BAD_FILES = {
    "corrupt.safetensors": lambda p: p.write_bytes(b"\x13\x37" * 64),
    "corrupt.pt": lambda p: p.write_bytes(b"not a pickle at all" * 8),
    "truncated.safetensors": _truncated,
    "truncated.pt": lambda p: (torch.save({"emb_params": torch.randn(2, 768)}, p),
                               p.write_bytes(p.read_bytes()[:300])),
    "empty.safetensors": lambda p: p.touch(),
    "wrongwidth.safetensors": lambda p: save_file({"emb_params": torch.randn(2, 512)}, p),
    "gonly.safetensors": lambda p: save_file({"clip_g": torch.randn(2, 1280)}, p),
    "nan.safetensors": lambda p: save_file({"emb_params": torch.tensor([[float("nan")] * 768])}, p),
    "inf.pt": lambda p: torch.save({"emb_params": torch.full((1, 768), float("inf"))}, p),
    "emptytensor.safetensors": lambda p: save_file({"emb_params": torch.zeros(0, 768)}, p),
    "intdtype.safetensors": lambda p: save_file({"emb_params": torch.zeros(2, 768, dtype=torch.int64)}, p),
    "threed.safetensors": lambda p: save_file({"emb_params": torch.zeros(1, 2, 768)}, p),
    "twokeys.safetensors": lambda p: save_file({"a": torch.zeros(1, 768), "b": torch.zeros(1, 768)}, p),
    "xlmismatch.safetensors": lambda p: save_file({"clip_l": torch.zeros(2, 768),
                                                   "clip_g": torch.zeros(3, 1280)}, p),
    "xlswapped.safetensors": lambda p: save_file({"clip_l": torch.zeros(2, 1280),
                                                  "clip_g": torch.zeros(2, 768)}, p),
    "multi.pt": lambda p: torch.save({"string_to_param": {"a": torch.zeros(1, 768),
                                                          "b": torch.zeros(1, 768)}}, p),
    "notadict.pt": lambda p: torch.save([1, 2, 3], p),
    "emb.txt": lambda p: p.write_text("hello"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_is_one_clear_error_and_no_output(tmp_path, name):
    src = tmp_path / name
    BAD_FILES[name](src)
    with pytest.raises(PrivdiffError) as exc:
        load_embedding(src)
    assert_one_line_error(exc, name)
    with pytest.raises(PrivdiffError):
        convert_embedding(src, tmp_path / "out.safetensors")
    assert listing(tmp_path) == [name]


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(PrivdiffError, match="no such file") as exc:
        load_embedding(tmp_path / "nope.safetensors")
    assert_one_line_error(exc, "nope.safetensors")
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(PrivdiffError, match="not a file"):
        inspect_embedding(tmp_path / "dir.pt")


def test_bad_vectors_refused_on_save(tmp_path):
    bad = Embedding({"clip_l": torch.full((2, 768), float("nan"))})
    with pytest.raises(PrivdiffError, match="NaN") as exc:
        save_embedding(bad, tmp_path / "e.safetensors")
    assert_one_line_error(exc, "e.safetensors")
    with pytest.raises(PrivdiffError, match="width 640"):
        save_embedding(Embedding({"clip_l": torch.zeros(1, 640)}), tmp_path / "e.safetensors")
    assert listing(tmp_path) == []


# ---------------------------------------------------------------- privacy report and CLI

def test_privacy_report_survives_every_format(tmp_path):
    emb = make("SD1")
    src = save_embedding(emb, tmp_path / "a.safetensors")
    for fmt, name in (("a1111-pt", "b.pt"), ("diffusers", "c.safetensors"), ("safetensors", "d.safetensors")):
        src = convert_embedding(src, tmp_path / name, fmt=fmt)
        report = inspect_embedding(src)["privacy_report"]
        assert report["epsilon"] == 1.5 and report["dataset_label"] == "pets", fmt
    assert inspect_embedding(save_embedding(make("SD1", metadata={"x": "y"}), tmp_path / "e.safetensors"))[
        "privacy_report"] is None


def test_malformed_report_is_named(tmp_path):
    bad = make("SD1", metadata={REPORT_KEY: "{not json"})
    path = save_embedding(bad, tmp_path / "bad.safetensors")  # metadata is carried, not interpreted
    with pytest.raises(PrivdiffError, match="privacy report") as exc:
        inspect_embedding(path)
    assert_one_line_error(exc, "bad.safetensors")
    with pytest.raises(PrivdiffError, match="privacy report") as exc:
        save_embedding(bad, tmp_path / "bad.pt", fmt="a1111-pt")
    assert_one_line_error(exc, "bad.pt")
    assert listing(tmp_path) == ["bad.safetensors"]


def test_cli_inspect_and_convert(tmp_path, capsys):
    src = save_embedding(make("SDXL", metadata=report_metadata()), tmp_path / "xl.safetensors")
    assert cli.main(["embedding", "inspect", str(src)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "safetensors/sdxl" and info["family"] == "SDXL"
    assert info["tensors"] == {"clip_l": [3, 768], "clip_g": [3, 1280]}
    assert info["privacy_report"]["epsilon"] == 1.5

    sd1 = save_embedding(make("SD1"), tmp_path / "a.safetensors")
    out = tmp_path / "a.pt"
    convert = ["embedding", "convert", str(sd1), str(out), "--format", "a1111-pt"]
    assert cli.main([*convert, "--token", "cat"]) == 0
    assert json.loads(capsys.readouterr().out) == {"written": str(out), "format": "a1111-pt"}
    assert load_embedding(out).token == "cat"
    assert cli.main(convert) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("privdiff: error:") and "a.pt already exists" in captured.err
    assert cli.main([*convert, "--force"]) == 0


def test_cli_bad_file_exit_code(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"garbage")
    assert cli.main(["embedding", "inspect", str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "broken.safetensors" in captured.err
