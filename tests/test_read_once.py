"""Each private file is read once: the ledger charges exactly the bytes released (issue 19, items 4 and 5).

A file replaced between loading and the charge, or between the charge and decoding, must not make the
ledger charge other images than those whose pixels the release used; a request at another resolution or
with other pixels is a new request, not "the same request released before".
"""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from privdiff.app.embeddings import aggregate_files, train_embedding
from privdiff.app.guidance import make_style_target
from privdiff.app.release_options import Release, folder_state
from privdiff.app.spectral import finetune_spectral
from privdiff.cli.main import main
from privdiff.demo.data import write_style_images
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.io.images import load_private_dataset
from privdiff.privacy.ledger import BudgetLedger

CONFIG = TIConfig(steps=1, batch_size=4)
CLI_PRIVACY = ["--epsilon", "2", "--delta", "1e-3", "--public-size", "10", "--accountant", "rdp"]


@pytest.fixture
def folder(tmp_path):
    return write_style_images(tmp_path / "private", count=4, size=32)


def _digests(folder: Path) -> set[str]:
    """SHA-256 of the folder's files as they are now."""
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def _charged(ledger: Path) -> set[str]:
    return set(json.loads(ledger.read_text())["images"])


def _replace(file: Path) -> None:
    """Another image under the same name."""
    Image.new("RGB", (32, 32), (0, 200, 40)).save(file)


def _replace_after_reserve(monkeypatch, file: Path) -> None:
    """Replace ``file`` on disk as soon as the ledger has reserved the release (before any pixel is decoded)."""
    reserve = BudgetLedger.reserve

    def reserve_then_replace(self, *args, **kwargs):
        reservation = reserve(self, *args, **kwargs)
        _replace(file)
        return reservation

    monkeypatch.setattr(BudgetLedger, "reserve", reserve_then_replace)


def _release(**overrides) -> Release:
    options = dict(name="style", epsilon=8.0, delta=1e-3, sample_rate=1.0, clip_norm=1.0, bound="clip",
                   prompt_template="{}")
    return Release(**{**options, **overrides})


# ---------------------------------------------------------------- the CLI: replaced after the charge


def test_cli_ti_aggregate_releases_the_bytes_it_charged(tmp_path, folder, capsys, monkeypatch):
    import privdiff.embeddings.methods

    before, loaded = _digests(folder), load_private_dataset(folder, 32).images
    released = []
    method = privdiff.embeddings.methods.METHODS["dpagg"]

    def recording(backend, images, *args, **kwargs):
        released.append(images.clone())
        return method(backend, images, *args, **kwargs)

    monkeypatch.setitem(privdiff.embeddings.methods.METHODS, "dpagg", recording)
    _replace_after_reserve(monkeypatch, folder / "private_001.png")
    ledger = tmp_path / "ledger.json"
    code = main(["ti-aggregate", "--model", "tiny", "--images", str(folder), "--out", str(tmp_path / "e.safetensors"),
                 "--steps", "1", "--resolution", "32", *CLI_PRIVACY, "--ledger", str(ledger)])
    assert code == 0, capsys.readouterr().err
    assert _charged(ledger) == before != _digests(folder)
    (images,) = released
    assert torch.equal(images, loaded)  # the pixels of the charged bytes, not of the file now on disk


def test_cli_guidance_target_releases_the_bytes_it_charged(tmp_path, folder, capsys, monkeypatch):
    import privdiff.guidance.target
    from privdiff.models.image_encoders import tiny_image_encoder

    before, loaded = _digests(folder), load_private_dataset(folder, tiny_image_encoder().size).images
    released = []
    make_target = privdiff.guidance.target.make_target

    def recording(encoder, images, *args, **kwargs):
        released.append(images.clone())
        return make_target(encoder, images, *args, **kwargs)

    monkeypatch.setattr(privdiff.guidance.target, "make_target", recording)
    _replace_after_reserve(monkeypatch, folder / "private_002.png")
    ledger = tmp_path / "ledger.json"
    code = main(["guidance", "target", "--images", str(folder), "--out", str(tmp_path / "t.safetensors"),
                 "--image-encoder", "tiny", *CLI_PRIVACY, "--ledger", str(ledger)])
    assert code == 0, capsys.readouterr().err
    assert _charged(ledger) == before != _digests(folder)
    (images,) = released
    assert torch.equal(images, loaded)


# ---------------------------------------------------------------- the GUI fronts (ComfyUI nodes, A1111 tabs)


def test_gui_embedding_charges_the_loaded_bytes_not_the_files_now_on_disk(sd1_backend, tmp_path, folder):
    dataset = load_private_dataset(folder, 32)  # Load Private Images' output, possibly cached by ComfyUI
    before = _digests(folder)
    _replace(folder / "private_000.png")
    ledger = tmp_path / "ledger.json"
    train_embedding(sd1_backend, dataset, "dpagg", CONFIG, _release(), tmp_path, default_ledger=ledger)
    assert _charged(ledger) == before != _digests(folder)


def test_gui_style_target_charges_the_loaded_bytes(tmp_path, folder):
    from privdiff.models.image_encoders import tiny_image_encoder

    dataset = load_private_dataset(folder, 32)
    before = _digests(folder)
    _replace(folder / "private_003.png")
    ledger = tmp_path / "ledger.json"
    make_style_target(tiny_image_encoder(), dataset, _release(bound="normalize", public_size=10), tmp_path,
                               default_ledger=ledger)
    assert _charged(ledger) == before != _digests(folder)


def test_gui_spectral_finetune_trains_on_the_bytes_it_charged(public_prior, tmp_path, folder, monkeypatch):
    import privdiff.wavelet.workflow as workflow
    from privdiff.wavelet.prior import load_prior
    from privdiff.wavelet.training import TrainConfig

    tokenizer = load_prior(public_prior).tokenizer
    before, expected = _digests(folder), tokenizer.encode(load_private_dataset(folder, tokenizer.size).images)
    trained = []
    finetune = workflow.finetune

    def recording(prior, tokens, *args, **kwargs):
        trained.append(tokens.clone())
        return finetune(prior, tokens, *args, **kwargs)

    monkeypatch.setattr(workflow, "finetune", recording)
    _replace_after_reserve(monkeypatch, folder / "private_001.png")
    (tmp_path / "priors").mkdir()
    ledger = tmp_path / "ledger.json"
    finetune_spectral(public_prior, folder, _release(sample_rate=0.5), TrainConfig(steps=1),
                               tmp_path / "priors", tmp_path / "checkpoints", default_ledger=ledger)
    assert _charged(ledger) == before != _digests(folder)
    (tokens,) = trained
    assert torch.equal(tokens, expected)


# ---------------------------------------------------------------- change checks and request keys


def test_folder_state_sees_an_edit_that_keeps_size_and_mtime(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    file = folder / "a.png"
    file.write_bytes(b"first image")
    stat = file.stat()
    state = folder_state(folder)
    file.write_bytes(b"other image")  # the same size
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns
    assert folder_state(folder) != state


def test_another_resolution_or_other_pixels_is_a_new_request(sd1_backend, tmp_path, folder):
    ledger, out = tmp_path / "ledger.json", tmp_path / "embeddings"
    out.mkdir()
    options = _release(overwrite=True)
    train_embedding(sd1_backend, load_private_dataset(folder, 32), "dpagg", CONFIG, options, out,
                             default_ledger=ledger)
    _, again, _ = train_embedding(sd1_backend, load_private_dataset(folder, 32), "dpagg", CONFIG, options,
                                           out, default_ledger=ledger)
    assert "released before" in again  # the same request: returned, not charged again
    _, larger, _ = train_embedding(sd1_backend, load_private_dataset(folder, 64), "dpagg", CONFIG, options,
                                            out, default_ledger=ledger)
    assert "released before" not in larger
    _replace(folder / "private_002.png")
    _, other, _ = train_embedding(sd1_backend, load_private_dataset(folder, 64), "dpagg", CONFIG, options,
                                           out, default_ledger=ledger)
    assert "released before" not in other
    assert len(json.loads(ledger.read_text())["releases"]) == 3


def test_a_style_target_at_another_resolution_is_a_new_request(tmp_path, folder):
    from privdiff.models.image_encoders import tiny_image_encoder

    encoder, ledger = tiny_image_encoder(), tmp_path / "ledger.json"
    options = _release(bound="normalize", public_size=10, overwrite=True)
    make_style_target(encoder, load_private_dataset(folder, 32), options, tmp_path, default_ledger=ledger)
    again, _ = make_style_target(encoder, load_private_dataset(folder, 32), options, tmp_path,
                                          default_ledger=ledger)
    assert "released before" in again
    larger, _ = make_style_target(encoder, load_private_dataset(folder, 64), options, tmp_path,
                                           default_ledger=ledger)
    assert "released before" not in larger
    assert len(json.loads(ledger.read_text())["releases"]) == 2


def test_a_fine_tune_refuses_a_ledger_charging_other_images(public_prior, tmp_path, folder):
    from privdiff.errors import PrivdiffError
    from privdiff.io.images import read_private_files
    from privdiff.release.artifact import open_ledger
    from privdiff.release.dp_params import DPParams
    from privdiff.wavelet.training import TrainConfig
    from privdiff.wavelet.workflow import finetune_prior

    other = read_private_files(write_style_images(tmp_path / "other", count=4, size=32, seed=5))
    params = DPParams(epsilon=8.0, delta=1e-3, sample_rate=0.5, clip_norm=1.0)
    with pytest.raises(PrivdiffError, match="charges other images"):
        finetune_prior(public_prior, read_private_files(folder), tmp_path / "dp.safetensors", params,
                       TrainConfig(steps=1), ledger=open_ledger(tmp_path / "ledger.json", other.digests),
                       checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ledger.json").exists() and not (tmp_path / "dp.safetensors").exists()


def test_private_files_decode_the_bytes_read_and_refuse_duplicates(tmp_path, folder):
    from privdiff.errors import PrivdiffError
    from privdiff.io.images import read_private_files

    private = read_private_files(folder)
    before, loaded = _digests(folder), load_private_dataset(folder, 32)
    _replace(folder / "private_000.png")
    dataset = private.load(32)
    assert set(dataset.digests) == set(loaded.digests) == before and torch.equal(dataset.images, loaded.images)
    (folder / "copy.png").write_bytes((folder / "private_001.png").read_bytes())
    with pytest.raises(PrivdiffError, match="private_001.png is identical to .*copy.png"):
        load_private_dataset(folder, 32)


def test_open_ledger_refuses_no_images_and_a_duplicated_digest(tmp_path):
    from privdiff.errors import PrivdiffError
    from privdiff.release.artifact import open_ledger

    digest = hashlib.sha256(b"image").hexdigest()
    for digests, needle in (([], "without image files"), ([digest, digest], "identical")):
        with pytest.raises(PrivdiffError, match=needle):
            open_ledger(tmp_path / "ledger.json", digests)
    with pytest.raises(TypeError, match="not their paths"):
        open_ledger(tmp_path / "ledger.json", [tmp_path / "a.png"])
    assert open_ledger(tmp_path / "ledger.json", [digest]).digests == [digest]


def test_an_aggregate_with_a_changed_centre_under_the_same_name_is_a_new_request(tmp_path, folder):
    from privdiff.embeddings.files import Embedding, save_embedding

    per_image, out, center = tmp_path / "per_image", tmp_path / "embeddings", tmp_path / "center.safetensors"
    per_image.mkdir()
    out.mkdir()
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        save_embedding(Embedding({"clip_l": torch.randn(1, 768, generator=generator) * 0.1}),
                       per_image / f"img{i}.safetensors")
    options, ledger = _release(overwrite=True), tmp_path / "ledger.json"

    def aggregate() -> str:
        return aggregate_files(str(per_image), True, str(center), options, out, images_folder=str(folder),
                                        default_ledger=ledger)[1]

    save_embedding(Embedding({"clip_l": torch.zeros(1, 768)}), center)
    aggregate()
    assert "released before" in aggregate()
    save_embedding(Embedding({"clip_l": torch.full((1, 768), 0.01)}), center, force=True)
    assert "released before" not in aggregate()
    assert len(json.loads(ledger.read_text())["releases"]) == 2
