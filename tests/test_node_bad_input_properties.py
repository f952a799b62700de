"""Property tests of the nodes' contract: a bad input value stops a DP node with one line that names the input,
before any training, and leaves the embeddings folder and the ledger as they were (privdiff/app/, no ComfyUI).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privdiff.app.embeddings import aggregate_files, train_embedding
from privdiff.app.release_options import Release
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding, save_embedding
from privdiff.embeddings.methods import METHODS
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import load_private_dataset

PROFILE = settings(derandomize=True, deadline=None, database=None, max_examples=60,
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VALID = dict(name="prop_style", epsilon=8.0, delta=1e-3, sample_rate=1.0, clip_norm=1.0, bound="clip",
             prompt_template="a painting in the style of {}")
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _bad_real(low: float, high: float | None = None, low_ok: bool = False) -> st.SearchStrategy[float]:
    """Floats outside [low, high] (``low`` itself is bad unless ``low_ok``), and non-finite ones."""
    below = st.floats(max_value=low, exclude_max=low_ok, allow_nan=False, allow_infinity=False)
    parts = [NOT_FINITE, below]
    if high is not None:
        parts.append(st.floats(min_value=high, exclude_min=True, allow_nan=False, allow_infinity=False))
    return st.one_of(*parts)


# input name -> (bad values, what the one-line message must name)
BAD_INPUTS = {
    "epsilon": (st.one_of(NOT_FINITE, st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)),
                "epsilon"),
    "delta": (_bad_real(0.0, 1.0 / 6), "delta"),
    "sample_rate": (_bad_real(0.0, 1.0), "sample_rate"),
    "clip_norm": (_bad_real(0.0), "clip_norm"),
    "bound": (st.text(max_size=8).filter(lambda b: b not in ("clip", "normalize")), "bound"),
    "public_size": (st.integers(max_value=-1), "public_size"),
    "name": (st.sampled_from(["", "../up", "a/b", "-lead", "x" * 101, "sp ace"]), "embedding name"),
    "prompt_template": (st.text(max_size=20).filter(lambda t: t.count("{}") != 1), "prompt template"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = write_style_images(tmp_path_factory.mktemp("private"), count=6, size=32)
    return load_private_dataset(folder, 32)


@pytest.fixture
def no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a bad input reached training")

    monkeypatch.setitem(METHODS, "dpagg", refuse)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_refused(call, input_name: str, needle: str, folder: Path) -> None:
    before = _snapshot(folder)
    with pytest.raises(PrivdiffError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message.strip() and message.strip(), message
    assert needle in message, f"{input_name}: {message}"
    assert not message.lstrip().startswith("--") and " --" not in message.replace("(--", "("), message
    assert _snapshot(folder) == before


@pytest.mark.parametrize("input_name", sorted(BAD_INPUTS))
def test_dp_textual_inversion_refuses_bad_values_naming_the_input(input_name, sd1_backend, dataset, tmp_path,
                                                                  no_training):
    strategy, needle = BAD_INPUTS[input_name]
    (tmp_path / "embeddings").mkdir()
    (tmp_path / "user").mkdir()
    ledger = tmp_path / "user" / "ledger.json"

    @PROFILE
    @given(value=strategy)
    def check(value):
        release = Release(**{**VALID, input_name: value})
        _assert_refused(lambda: train_embedding(sd1_backend, dataset, "dpagg", TIConfig(steps=1), release,
                                                      tmp_path / "embeddings", default_ledger=ledger),
                        input_name, needle, tmp_path)

    check()


@pytest.mark.parametrize("input_name", ["noise_multiplier", "sample_rate", "clip_norm", "delta"])
def test_dp_aggregate_refuses_bad_values_naming_the_input(input_name, tmp_path):
    per_image = tmp_path / "per_image"
    per_image.mkdir()
    for i in range(6):
        save_embedding(Embedding({"clip_l": torch.randn(1, 768) * 0.1}), per_image / f"img{i}.safetensors")
    (tmp_path / "embeddings").mkdir()
    strategy, needle = (_bad_real(0.0), "noise_multiplier") if input_name == "noise_multiplier" \
        else BAD_INPUTS[input_name]

    @PROFILE
    @given(value=strategy)
    def check(value):
        options = {**VALID, "epsilon": 0.0, "noise_multiplier": 2.0, input_name: value}
        if input_name == "noise_multiplier" and value == 0:
            options["epsilon"] = 0.0  # neither set: also refused, naming both inputs
        release = Release(**options)
        _assert_refused(lambda: aggregate_files(str(per_image), True, "", release, tmp_path / "embeddings"),
                        input_name, needle, tmp_path)

    check()
