"""The fronts' plain logic (privdiff/app/, used by the ComfyUI nodes), run on the tiny diffusers backend."""

import json

import pytest
import torch

from privdiff.app.embeddings import aggregate_files, train_embedding
from privdiff.app.guidance import make_style_target
from privdiff.app.release_options import Release, embedding_target, folder_state, prompt_for, target_path
from privdiff.app.reports import read_report
from privdiff.app.spectral import finetune_spectral
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding, inspect_embedding, save_embedding
from privdiff.embeddings.methods import METHODS
from privdiff.embeddings.textual_inversion import TIConfig
from privdiff.errors import PrivdiffError
from privdiff.io.images import load_private_dataset

CONFIG = TIConfig(steps=2, batch_size=4)


def release(**overrides) -> "Release":
    options = dict(name="unit_style", epsilon=8.0, delta=1e-3, sample_rate=1.0, clip_norm=1.0, bound="clip",
                   prompt_template="a painting in the style of {}")
    return Release(**{**options, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = write_style_images(tmp_path_factory.mktemp("private"), count=6, size=32)
    return load_private_dataset(folder, 32)


def test_embedding_target_checks_names_and_existing_files(tmp_path):
    assert embedding_target(tmp_path, "my.style-1", False) == tmp_path / "my.style-1.safetensors"
    for bad in ["", "../up", "a/b", "-lead", "x" * 101]:
        with pytest.raises(PrivdiffError, match="embedding name"):
            embedding_target(tmp_path, bad, False)
    (tmp_path / "taken.pt").write_bytes(b"x")
    with pytest.raises(PrivdiffError, match="taken.pt already exists"):
        embedding_target(tmp_path, "taken", True)  # a .pt twin would shadow the new file
    (tmp_path / "mine.safetensors").write_bytes(b"x")
    with pytest.raises(PrivdiffError, match="already exists"):
        embedding_target(tmp_path, "mine", False)
    assert embedding_target(tmp_path, "mine", True).name == "mine.safetensors"


def test_prompt_template_needs_one_placeholder():
    assert prompt_for("art in the style of {}", "s") == "art in the style of embedding:s"
    for bad in ["no placeholder", "{} and {}"]:
        with pytest.raises(PrivdiffError, match="prompt template"):
            prompt_for(bad, "s")


def test_release_options_map_to_mechanism_parameters():
    assert release().seed() is None and release(reproducible_seed=5).seed() == 5
    assert release().params().noise_multiplier is None and release().params().epsilon == 8.0
    fixed = release(noise_multiplier=2.0, epsilon=0.0).params()
    assert fixed.noise_multiplier == 2.0 and fixed.epsilon is None
    for both_or_neither in (release(noise_multiplier=2.0), release(epsilon=0.0)):
        with pytest.raises(PrivdiffError, match="set exactly one of epsilon"):
            both_or_neither.params()
    assert release().params().public_size is None and release(public_size=40).params().public_size == 40
    assert release(dataset_label="  ").label() is None


def test_train_embedding_writes_a_loadable_file_with_report(sd1_backend, dataset, tmp_path):
    calls = []
    prompt, report, name = train_embedding(
        sd1_backend, dataset, "dpagg", CONFIG, release(dataset_label="unit"), tmp_path,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert prompt == "a painting in the style of embedding:unit_style" and name == "unit_style"
    assert "PRIVATE release" in report and "epsilon=8" in report and "dataset: unit" in report
    assert calls[-1] == (2 * CONFIG.steps, 2 * CONFIG.steps)  # 6 images: batches of 4 and 2
    info = inspect_embedding(tmp_path / "unit_style.safetensors")
    assert info["family"] == "SD1" and info["privacy_report"]["epsilon"] == 8.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unit_style.safetensors"]


def test_cancelled_training_writes_nothing(sd1_backend, dataset, tmp_path):
    def cancel(done, total):
        raise KeyboardInterrupt  # what ComfyUI's progress bar raises on cancel, in spirit

    ledger = tmp_path / "ledger.json"
    with pytest.raises(KeyboardInterrupt):
        train_embedding(sd1_backend, dataset, "dpagg", CONFIG,
                              release(ledger_path=str(ledger), budget_epsilon=20.0), tmp_path, progress=cancel)
    assert not (tmp_path / "unit_style.safetensors").exists()
    assert not ledger.exists()  # the cancelled reservation had created it: nothing is left
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ledger_refuses_a_release_over_budget(sd1_backend, dataset, tmp_path):
    ledger = str(tmp_path / "ledger.json")
    train_embedding(sd1_backend, dataset, "dpagg", CONFIG,
                          release(name="first", ledger_path=ledger, budget_epsilon=10.0), tmp_path)
    with pytest.raises(PrivdiffError, match="refused"):
        train_embedding(sd1_backend, dataset, "dpagg", CONFIG,
                              release(name="second", ledger_path=ledger), tmp_path)
    assert not (tmp_path / "second.safetensors").exists()


def test_bad_inputs_fail_before_training(sd1_backend, dataset, tmp_path):
    with pytest.raises(PrivdiffError, match="unknown method"):
        train_embedding(sd1_backend, dataset, "magic", CONFIG, release(), tmp_path)
    with pytest.raises(PrivdiffError, match="delta"):
        train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(delta=0.5), tmp_path)
    with pytest.raises(PrivdiffError, match="prompt template"):
        train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(prompt_template="x"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_aggregate_files_and_read_report(tmp_path):
    per_image = tmp_path / "per_image"
    per_image.mkdir()
    for i in range(5):
        save_embedding(Embedding({"clip_l": torch.randn(1, 768) * 0.1}), per_image / f"img{i}.safetensors")
    out = tmp_path / "embeddings"
    out.mkdir()
    with pytest.raises(PrivdiffError, match="confirm it by enabling one_image_per_file"):
        aggregate_files(str(per_image), False, "", release(), out)
    with pytest.raises(PrivdiffError, match="set images_folder"):
        aggregate_files(str(per_image), True, "", release(), out, default_ledger=tmp_path / "ledger.json")
    prompt, report, name = aggregate_files(str(per_image), True, "", release(noise_multiplier=3.0, epsilon=0),
                                                 out)
    assert "embedding:unit_style" in prompt and "noise multiplier 3" in report
    text = read_report(out / "unit_style.safetensors")
    assert "PRIVATE release" in text and '"noise_multiplier": 3.0' in text
    assert "carries no privdiff privacy report" in read_report(per_image / "img0.safetensors")


def test_an_identical_request_is_returned_not_released_again(sd1_backend, dataset, tmp_path, monkeypatch):
    ledger = tmp_path / "user" / "ledger.json"
    ledger.parent.mkdir()
    out = tmp_path / "embeddings"
    out.mkdir()
    first = train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(), out, default_ledger=ledger)
    written = (out / "unit_style.safetensors").read_bytes()

    def no_training(*args, **kwargs):
        raise AssertionError("an identical request must not train again")

    monkeypatch.setitem(METHODS, "dpagg", no_training)
    again = train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(), out, default_ledger=ledger)
    assert again[0] == first[0] and again[2] == first[2] and "released before" in again[1]
    assert (out / "unit_style.safetensors").read_bytes() == written
    assert len(json.loads(ledger.read_text())["releases"]) == 1  # charged once
    with pytest.raises(AssertionError, match="must not train"):  # other parameters: a new request
        train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(epsilon=7.0, overwrite=True), out,
                              default_ledger=ledger)
    monkeypatch.undo()
    with pytest.raises(PrivdiffError, match="already exists"):  # a new release must also choose to overwrite
        train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(new_release=True), out,
                              default_ledger=ledger)
    train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(new_release=True, overwrite=True), out,
                          default_ledger=ledger)
    assert len(json.loads(ledger.read_text())["releases"]) == 2  # the ledger sees the explicit new release


def test_folder_state_follows_the_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a")
    state = folder_state(folder)
    assert folder_state(folder) == state
    (folder / "b.png").write_bytes(b"b")
    assert folder_state(folder) != state
    state = folder_state(folder)
    (folder / "b.png").write_bytes(b"bb")
    assert folder_state(folder) != state
    assert folder_state(tmp_path / "missing") != folder_state(folder)


def test_report_text_names_relation_bound_and_centre(sd1_backend, dataset, tmp_path):
    _, text, _ = train_embedding(sd1_backend, dataset, "dpagg", CONFIG, release(public_size=50), tmp_path)
    assert "neighbouring relation: add-remove, public size 50" in text
    assert "(clip, centre: init word 'style'" in text


def test_style_target_node_releases_once_and_refuses_clobbering(tmp_path, dataset):
    from privdiff.guidance.target import load_target
    from privdiff.models.image_encoders import tiny_image_encoder

    encoder = tiny_image_encoder()
    ledger = tmp_path / "ledger.json"
    options = release(name="cats", clip_norm=1.0, bound="normalize", prompt_template="{}", public_size=10)
    text, name = make_style_target(encoder, dataset, options, tmp_path, default_ledger=ledger)
    assert name == "cats" and "PRIVATE release" in text and encoder.identity in text
    target = load_target(tmp_path / "cats.safetensors")
    assert target.encoder == encoder.identity and target.report.bound == "normalize"
    releases = json.loads(ledger.read_text())["releases"]
    again, _ = make_style_target(encoder, dataset, options, tmp_path, default_ledger=ledger)
    assert "released before" in again and json.loads(ledger.read_text())["releases"] == releases
    with pytest.raises(PrivdiffError, match="already exists"):
        make_style_target(encoder, dataset, release(name="cats", clip_norm=1.0, bound="normalize",
                                                          prompt_template="{}", new_release=True),
                                tmp_path, default_ledger=ledger)
    assert target_path(tmp_path, "cats") == tmp_path / "cats.safetensors"
    assert target_path(tmp_path, str(tmp_path / "x.safetensors")) == tmp_path / "x.safetensors"
    with pytest.raises(PrivdiffError, match="target name"):
        target_path(tmp_path, "../up")


@pytest.fixture(scope="module")
def public_prior_file(tmp_path_factory):
    """A tiny public spectral prior (tokenizer and prior fitted on a few procedural public images)."""
    from privdiff.reference.shapes import public_dataset
    from privdiff.wavelet.prior import PriorConfig, SpectralPrior, save_prior
    from privdiff.wavelet.tokenizer import fit_tokenizer
    from privdiff.wavelet.training import TrainConfig, pretrain

    images = torch.from_numpy(public_dataset(24, seed=0)[0]).permute(0, 3, 1, 2).float()
    tokenizer = fit_tokenizer(images, size=32, base=4, codebook_size=8, iterations=4)
    torch.manual_seed(0)
    prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=16, layers=1, heads=2))
    pretrain(prior, tokenizer.encode(images), TrainConfig(steps=2, batch_size=8))
    return save_prior(prior, tokenizer, tmp_path_factory.mktemp("public_priors") / "public.safetensors")


def test_spectral_finetune_releases_a_dp_prior_once_per_name(public_prior_file, tmp_path):
    from privdiff.wavelet.prior import load_prior
    from privdiff.wavelet.training import TrainConfig

    private = write_style_images(tmp_path / "private", count=6, size=32)
    priors, checkpoints, ledger = tmp_path / "priors", tmp_path / "checkpoints", tmp_path / "ledger.json"
    priors.mkdir()
    options = release(name="dp_prior", sample_rate=0.5, dataset_label="unit", prompt_template="{}")
    config = TrainConfig(steps=3, lr=1e-3)
    calls = []
    text, path = finetune_spectral(public_prior_file, private, options, config, priors, checkpoints,
                                         progress=lambda done, total: calls.append((done, total)),
                                         default_ledger=ledger)
    assert path == priors / "dp_prior.safetensors" and calls[-1] == (3, 3)
    assert "PRIVATE release" in text and "spectral" in text and "epsilon=8" in text and "dataset: unit" in text
    assert "resumed" not in text
    report = load_prior(path).report
    assert report is not None and report.private and report.epsilon <= 8.0 + 1e-9 and report.steps == 3
    assert report.release_id in text
    assert list(checkpoints.iterdir()) == []  # the private checkpoint is gone once the prior is released
    assert [p.name for p in priors.iterdir()] == ["dp_prior.safetensors"]
    releases = json.loads(ledger.read_text())["releases"]
    assert list(releases) == [report.release_id]

    written = path.read_bytes()
    again, same = finetune_spectral(public_prior_file, private, options, config, priors, checkpoints,
                                          default_ledger=ledger)  # the same request: the earlier release
    assert same == path and "released before" in again and report.release_id in again
    with pytest.raises(PrivdiffError, match="already exists; pick another name or enable overwrite"):
        finetune_spectral(public_prior_file, private, release(**{**options.__dict__, "new_release": True}),
                                config, priors, checkpoints, default_ledger=ledger)
    assert path.read_bytes() == written and json.loads(ledger.read_text())["releases"] == releases


def test_spectral_finetune_refuses_bad_input_before_writing(public_prior_file, tmp_path):
    from privdiff.wavelet.training import TrainConfig

    private = write_style_images(tmp_path / "private", count=6, size=32)
    empty = tmp_path / "empty"
    empty.mkdir()
    priors, checkpoints, ledger = tmp_path / "priors", tmp_path / "checkpoints", tmp_path / "ledger.json"
    priors.mkdir()
    config = TrainConfig(steps=2)
    with pytest.raises(PrivdiffError, match="holds no images"):
        finetune_spectral(public_prior_file, empty, release(), config, priors, checkpoints,
                                default_ledger=ledger)
    with pytest.raises(PrivdiffError, match="delta"):  # 6 images: delta must be below 1/6
        finetune_spectral(public_prior_file, private, release(delta=0.2), config, priors, checkpoints,
                                default_ledger=ledger)
    assert list(priors.iterdir()) == [] and not ledger.exists() and not checkpoints.exists()
