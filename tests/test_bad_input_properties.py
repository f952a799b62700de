"""Property tests of the CLI contract: every bad input gets one line ``privdiff: error: ...`` on stderr,
exit code 2, no traceback, nothing on stdout, and no file created or changed.

Bad numbers (NaN, infinities, negatives, zero, huge, non-numeric text) for every numeric flag, bad paths
(missing, a directory, a special file, an existing output without --force, a wrong extension) and corrupt
files (random bytes, truncated safetensors, garbage JSON headers, random bytes named like images) are fed
to ``privdiff.cli.main`` in-process. Baselines are valid, so an input that is wrongly accepted shows as a
release written (and a slow test). Examples are derandomized for CI; the file runs in about a minute.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding, save_embedding

settings.register_profile(
    "privdiff-bad-input", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
PROFILE = settings.get_profile("privdiff-bad-input")
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False

# ---------------------------------------------------------------- the workspace and the contract


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """Valid inputs and the usual traps, shared by every example (each one checks it leaves them as they were)."""
    root = tmp_path_factory.mktemp("ws")
    write_style_images(root / "images", count=3, size=32)
    (root / "per_image").mkdir()
    for i in range(3):
        save_embedding(Embedding({"clip_l": torch.randn(1, 768) * 0.05}), root / "per_image" / f"e{i}.safetensors")
    save_embedding(Embedding({"clip_l": torch.randn(2, 768)}), root / "src.safetensors")
    torch.save({"emb_params": torch.randn(2, 768)}, root / "src.pt")
    (root / "exists.safetensors").write_bytes(b"keep me")
    (root / "exists.pt").write_bytes(b"keep me too")
    (root / "orphan.pt.privacy.json").write_text("{}")
    (root / "taken.pt.privacy.json").mkdir()
    (root / "adir.safetensors").mkdir()
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not an embedding")
    (root / "no_images").mkdir()
    (root / "no_images" / "readme.txt").write_text("no images here")
    (root / "dangling.safetensors").symlink_to(root / "nowhere.safetensors")
    if hasattr(os, "mkfifo"):
        os.mkfifo(root / "fifo.safetensors")
    return root


# The contract's checks, shared with the other bad-input tests (loaded by path: tests/ is not a package).
_spec = importlib.util.spec_from_file_location("privdiff_cli_checks", Path(__file__).with_name("cli_checks.py"))
_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_checks)
assert_refused = _checks.refused


# ---------------------------------------------------------------- bad numbers


def _not_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


def _not_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return True
    return False


NON_FINITE = st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "-Infinity", "1e999", "-1e999"])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=10)
NON_NUMERIC = TEXT.filter(_not_float)
NOT_POSITIVE = st.one_of(st.just("0"), st.just("-0.0"), st.floats(max_value=0, allow_nan=False, allow_infinity=False)
                         .map(repr))


def bad_real(high: float = math.inf, high_open: bool = False) -> st.SearchStrategy[str]:
    """Text that is not a finite number in (0, high] (or (0, high) when ``high_open``)."""
    options = [NON_FINITE, NOT_POSITIVE, NON_NUMERIC]
    if math.isfinite(high):
        options += [st.floats(min_value=high, exclude_min=not high_open, allow_infinity=False).map(repr),
                    st.just("1e300")]
    return st.one_of(options)


def bad_int(low: int, high: int) -> st.SearchStrategy[str]:
    """Text that is not an integer in low..high."""
    return st.one_of(
        st.integers(min_value=low - 10**6, max_value=low - 1).map(str),
        st.integers(min_value=high + 1, max_value=high * 10**6).map(str),
        st.sampled_from(["1.5", "1e3", "2.0", "0x10"]),
        NON_FINITE,
        TEXT.filter(_not_int),
    )


POSITIVE, UNIT, RATE = bad_real(), bad_real(1.0, high_open=True), bad_real(1.0)
RELEASE = {"--epsilon": POSITIVE, "--delta": UNIT, "--sample-rate": RATE, "--clip-norm": bad_real(1e4),
           "--budget-epsilon": POSITIVE, "--budget-delta": UNIT, "--public-size": bad_int(1, 10**9),
           "--reproducible-seed": bad_int(0, 2**64 - 1)}
NUMERIC = {
    "privacy epsilon": {"--noise-multiplier": POSITIVE, "--sample-rate": RATE, "--steps": bad_int(1, 10**9),
                        "--delta": UNIT},
    "privacy sigma": {"--epsilon": POSITIVE, "--delta": UNIT, "--sample-rate": RATE, "--steps": bad_int(1, 10**9)},
    "ti-aggregate": {**RELEASE, "--vectors": bad_int(1, 75), "--steps": bad_int(1, 10**6), "--lr": bad_real(10.0),
                     "--batch-size": bad_int(1, 4096), "--resolution": bad_int(8, 4096)},
    "aggregate": {**RELEASE, "--noise-multiplier": POSITIVE},
    "lora": {**RELEASE, "--rank": bad_int(1, 1024), "--alpha": bad_real(1e6), "--steps": bad_int(1, 10**6),
             "--lr": bad_real(10.0), "--batch-size": bad_int(1, 4096), "--resolution": bad_int(8, 4096)},
}
FLAGS = [(command, flag) for command, flags in NUMERIC.items() for flag in flags]


def baseline(command: str, ws: Path) -> list[str]:
    """Valid arguments of ``command`` (the release commands would write ``new.safetensors``)."""
    out = ["--out", ws / "new.safetensors"]
    return {
        "privacy epsilon": ["privacy", "epsilon", "--noise-multiplier", "1", "--sample-rate", "0.01", "--steps", "10",
                            "--delta", "1e-5"],
        "privacy sigma": ["privacy", "sigma", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01",
                          "--steps", "10"],
        "ti-aggregate": ["ti-aggregate", "--model", "tiny", "--images", ws / "images", *out, "--epsilon", "2",
                         "--delta", "1e-3", "--steps", "1"],
        "aggregate": ["aggregate", "--embeddings", ws / "per_image", "--one-image-per-file", *out, "--epsilon", "2",
                      "--delta", "1e-3"],
        "lora": ["lora", "--model", "tiny", "--images", ws / "images", *out, "--epsilon", "2", "--delta", "1e-3",
                 "--steps", "1"],
    }[command]


def with_option(args: list, flag: str, value: str) -> list:
    """``args`` with ``flag`` set to ``value`` (as ``--flag=value``, so "-inf" is not taken for an option)."""
    if flag in args:
        i = args.index(flag)
        args = args[:i] + args[i + 2:]
    return [*args, f"{flag}={value}"]


@settings(PROFILE, max_examples=400)
@given(data=st.data())
def test_bad_numbers_are_refused_at_parse_time_naming_the_flag(ws, capsys, data):
    command, flag = data.draw(st.sampled_from(FLAGS), label="flag")
    value = data.draw(NUMERIC[command][flag], label="value")
    assert_refused(capsys, ws, with_option(baseline(command, ws), flag, value), f"argument {flag}")


# ---------------------------------------------------------------- bad paths


def bad_outputs(ws: Path) -> list[tuple[list, str]]:
    """(--out arguments, a word of the expected error) for outputs refused before any work."""
    return [
        ([ws / "exists.safetensors"], "already exists"),
        ([ws / "exists.pt"], "already exists"),
        ([ws / "orphan.pt"], "already exists"),
        ([ws / "taken.pt", "--force"], "is a directory"),
        ([ws / "adir.safetensors", "--force"], "is a directory"),
        ([ws, "--force"], "is a directory"),
        ([ws / "new.ckpt"], "extension"),
        ([ws / "new.pt", "--format", "safetensors"], "must end in"),
        ([ws / "new.safetensors", "--format", "a1111-pt"], "must end in"),
        ([ws / "missing" / "new.safetensors"], "does not exist"),
        ([ws / "notes.txt" / "new.safetensors"], "not a folder"),
        ([ws / "new.safetensors", "--token", "cat"], "store a token"),
        ([ws / "new.safetensors", "--format", "diffusers", "--token", "two words"], "token"),
        ([ws / "fifo.safetensors", "--force"], "not a regular file"),
    ]


def bad_inputs(ws: Path) -> list[tuple[Path, str]]:
    """(embedding file, a word of the expected error) for unreadable embedding inputs."""
    cases = [(ws / "missing.safetensors", "no such file"), (ws / "adir.safetensors", "not a file"),
             (ws / "empty", "not a file"), (ws / "notes.txt", "extension"),
             (ws / "dangling.safetensors", "no such file"), (ws / "fifo.safetensors", "not a file")]
    return [(path, word) for path, word in cases if path.name != "fifo.safetensors" or path.exists()]


def path_cases(ws: Path) -> list[tuple[list, str]]:
    """Every bad-path invocation: (arguments, a word of the expected error)."""
    src = ws / "src.safetensors"
    cases = []
    for path, word in bad_inputs(ws):
        cases += [(["embedding", "inspect", path], word),
                  (["embedding", "convert", path, ws / "new.safetensors"], word),
                  (with_option(baseline("aggregate", ws), "--center", str(path)), word)]
    ti, agg = baseline("ti-aggregate", ws), baseline("aggregate", ws)
    for (out, *flags), word in bad_outputs(ws):
        cases += [(["embedding", "convert", src, out, *flags], word),
                  ([*with_option(ti, "--out", str(out)), *flags], word),
                  ([*with_option(agg, "--out", str(out)), *flags], word)]
    for folder in (ws / "missing", ws / "notes.txt", ws / "empty", ws / "no_images"):
        cases += [(with_option(ti, "--images", str(folder)), folder.name),
                  (with_option(agg, "--embeddings", str(folder)), folder.name)]
    for model in (ws / "missing-model", ws / "notes.txt", ws / "src.pt", ws / "fifo.safetensors"):
        if model.name != "fifo.safetensors" or model.exists():
            cases.append((with_option(ti, "--model", str(model)), model.name))
    cases.append(([*with_option(ti, "--out", str(ws / ("n" * 240 + ".safetensors")))], "too long"))
    return cases


def test_every_bad_path_is_refused(ws, capsys, monkeypatch):
    """Exhaustive over the (small) set of bad paths; no model may load for any of them."""
    import privdiff.models.registry

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before a bad path was refused")

    monkeypatch.setattr(privdiff.models.registry, "load_model", no_model)
    for args, word in path_cases(ws):
        assert_refused(capsys, ws, args, word)


@pytest.mark.skipif(ROOT, reason="root reads files whatever their permissions")
def test_unreadable_embedding_is_refused(ws, capsys):
    target = ws / "unreadable.safetensors"
    shutil.copy(ws / "src.safetensors", target)
    target.chmod(0)
    try:
        assert_refused(capsys, ws, ["embedding", "inspect", target], "unreadable.safetensors")
    finally:
        target.chmod(0o644)
        target.unlink()


# ---------------------------------------------------------------- corrupt files


def _valid_safetensors() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"emb_params": torch.randn(2, 768)}, Path(tmp) / "v.safetensors")
        return (Path(tmp) / "v.safetensors").read_bytes()


def _valid_pt() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"emb_params": torch.randn(2, 768)}, Path(tmp) / "v.pt")
        return (Path(tmp) / "v.pt").read_bytes()


VALID_SAFETENSORS, VALID_PT = _valid_safetensors(), _valid_pt()
JSON_GARBAGE = st.one_of(
    st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"{}", b"[]", b"null", b'{"emb_params": 5}', b'{"emb_params": {"dtype": "F32"}}',
                     b'{"emb_params": {"dtype": "F32", "shape": [2, 768], "data_offsets": [0, 99999999]}}',
                     b'{"emb_params": {"dtype": "F32", "shape": [-1, 768], "data_offsets": [0, 0]}}',
                     b'{"__metadata__": {"a": 1}}', b'{"a": {"dtype": "I64", "shape": [1, 768], '
                     b'"data_offsets": [0, 6144]}}']),
)


@st.composite
def corrupt_embedding(draw) -> tuple[str, bytes]:
    """(suffix, content) of a file that is no embedding."""
    kind = draw(st.sampled_from(["random", "truncated", "json", "truncated-pt"]))
    if kind == "random":
        return draw(st.sampled_from([".safetensors", ".pt", ".bin"])), draw(st.binary(max_size=512))
    if kind == "truncated":
        return ".safetensors", VALID_SAFETENSORS[: draw(st.integers(0, len(VALID_SAFETENSORS) - 1))]
    if kind == "truncated-pt":
        return draw(st.sampled_from([".pt", ".bin"])), VALID_PT[: draw(st.integers(0, len(VALID_PT) - 1))]
    header = draw(JSON_GARBAGE)
    declared = draw(st.one_of(st.just(len(header)), st.integers(0, 2**64 - 1)))
    return ".safetensors", struct.pack("<Q", declared) + header + draw(st.binary(max_size=64))


def corrupt_use(ws: Path, folder: Path, where: str, suffix: str, content: bytes) -> list:
    """Arguments that feed a corrupt embedding file, written into ``folder``, to the entry point ``where``."""
    bad = folder / f"bad{suffix}"
    bad.write_bytes(content)
    if where == "inspect":
        return ["embedding", "inspect", bad]
    if where == "convert":
        return ["embedding", "convert", bad, folder / "out.safetensors"]
    if where == "center":
        return with_option(baseline("aggregate", ws), "--center", str(bad))
    for i in range(2):
        shutil.copy(ws / "per_image" / f"e{i}.safetensors", folder / f"e{i}.safetensors")
    return with_option(baseline("aggregate", ws), "--embeddings", str(folder))


@settings(PROFILE, max_examples=200)
@given(file=corrupt_embedding(), where=st.sampled_from(["inspect", "convert", "center", "per-image"]))
def test_corrupt_embedding_files_are_refused_naming_the_file(ws, capsys, file, where):
    folder = Path(tempfile.mkdtemp(dir=ws, prefix="case-"))
    try:
        assert_refused(capsys, ws, corrupt_use(ws, folder, where, *file), "bad")
    finally:
        shutil.rmtree(folder)


IMAGE_SUFFIXES = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"]


@settings(PROFILE, max_examples=20)
@given(suffix=st.sampled_from(IMAGE_SUFFIXES), content=st.binary(max_size=256),
       with_good=st.booleans())
def test_corrupt_images_are_refused_naming_the_file(ws, capsys, suffix, content, with_good):
    """Random bytes named like an image: one line naming the file (the tiny model may load first)."""
    folder = Path(tempfile.mkdtemp(dir=ws, prefix="images-"))
    if with_good:
        for path in sorted((ws / "images").iterdir())[:2]:
            shutil.copy(path, folder / path.name)
    (folder / f"zz_bad{suffix}").write_bytes(content)
    try:
        assert_refused(capsys, ws, with_option(baseline("ti-aggregate", ws), "--images", str(folder)),
                       f"zz_bad{suffix}")
    finally:
        shutil.rmtree(folder)
