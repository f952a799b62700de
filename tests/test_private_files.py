"""Who may read what privdiff writes: the ledger and private checkpoints are the owner's only (0600 in a
0700 folder) under any umask; released PNGs name files by base name and keep the HE prompt and seed out
unless asked."""

import json
import os
import stat
from pathlib import Path

import pytest
from PIL import Image

from privdiff.cli import main as cli
from privdiff.errors import PrivdiffError
from privdiff.io.atomic import PRIVATE, atomic_write_text, private_folder
from privdiff.io.images import read_private_files
from privdiff.privacy.ledger import BudgetLedger
from privdiff.privacy.report import make_report
from privdiff.release.artifact import open_ledger
from privdiff.release.dp_params import DPParams
from privdiff.wavelet import training
from privdiff.wavelet.workflow import default_checkpoint_dir, finetune_prior, pretrain_prior

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


@pytest.fixture(autouse=True)
def permissive_umask():
    """The usual 0o022: group and others may read whatever a plain write creates."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private_images(folder: Path, count: int = 6) -> Path:
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (16, 16), (40 * i, 255 - 30 * i, 7 * i)).save(folder / f"{i}.png")
    return folder


def test_atomic_writes_take_an_explicit_mode_and_private_folders_are_0700(tmp_path):
    assert _mode(atomic_write_text(tmp_path / "released.json", "{}")) == 0o644  # umask-respecting
    assert _mode(atomic_write_text(tmp_path / "private.json", "{}", mode=PRIVATE)) == 0o600
    assert _mode(atomic_write_text(tmp_path / "released.json", "{}", force=True, mode=PRIVATE)) == 0o600
    assert _mode(private_folder(tmp_path / "a" / "b")) == 0o700
    mine = tmp_path / "users"
    mine.mkdir(mode=0o755)
    assert _mode(private_folder(mine)) == 0o755  # a folder the user chose keeps its mode...
    assert _mode(private_folder(mine, tighten=True)) == 0o700  # ...one privdiff names itself does not
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrivdiffError, match="is a file, not a folder"):
        private_folder(tmp_path / "file")


def test_the_ledger_is_0600_even_when_it_existed_wider(tmp_path):
    path = tmp_path / "ledger.json"
    report = make_report(mechanism="gaussian", epsilon=0.93, delta=1e-5, noise_multiplier=4.0, sample_rate=1.0,
                         clip_norm=1.0, steps=1, accountant="pld", relation="add-remove", public_size=10)
    ledger = BudgetLedger(path)
    reservation = ledger.reserve(["a" * 64, "b" * 64], report)
    assert _mode(path) == 0o600 and "a" * 64 in path.read_text()
    path.chmod(0o644)  # written by an earlier privdiff
    reservation.commit()
    assert _mode(path) == 0o600
    assert not [p for p in tmp_path.iterdir() if p != path]  # no lock file or temporary left beside it


def test_finetune_checkpoints_are_0600_in_a_0700_folder(public_prior, tmp_path):
    images = _private_images(tmp_path / "private")
    params = DPParams(epsilon=None, delta=1e-3, sample_rate=0.5, clip_norm=1.0, noise_multiplier=1.2,
                      accountant="rdp")
    folder = tmp_path / "cache" / "ck"
    seen = []

    def stop_after_checkpoint(done, total):
        seen.extend((_mode(folder), _mode(p)) for p in folder.iterdir())
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_prior(public_prior, images, tmp_path / "dp.safetensors", params,
                       training.TrainConfig(steps=3, batch_size=4), checkpoint_dir=folder, checkpoint_every=1,
                       ledger=open_ledger(tmp_path / "ledger.json", read_private_files(images).digests),
                       progress=stop_after_checkpoint)
    assert seen and set(seen) == {(0o700, 0o600)}
    (checkpoint,) = folder.iterdir()
    assert checkpoint.name.startswith("wavelet-") and _mode(checkpoint) == 0o600
    assert _mode(tmp_path / "ledger.json") == 0o600


def test_pretraining_checkpoints_and_the_default_folder_are_private(public_prior, tmp_path, monkeypatch):
    from privdiff.wavelet.prior import load_prior

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    default = default_checkpoint_dir()
    default.mkdir(parents=True, mode=0o755)  # made by an earlier privdiff
    public = _private_images(tmp_path / "public", count=8)
    seen = []

    def stop_after_checkpoint(done, total):
        seen.extend((_mode(default), _mode(p)) for p in default.iterdir())
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pretrain_prior(load_prior(public_prior).tokenizer, public, tmp_path / "prior.safetensors",
                       training.TrainConfig(steps=3, batch_size=4), dim=16, layers=1, heads=2,
                       progress=stop_after_checkpoint, checkpoint_every=1)
    assert seen and set(seen) == {(0o700, 0o600)}


def _parameters(png: Path) -> dict:
    with Image.open(png) as image:
        return json.loads(image.text["parameters"])


def test_spectral_sample_pngs_name_the_prior_by_base_name(public_prior, tmp_path, capsys):
    out = tmp_path / "samples"
    assert cli.main(["wavelet", "sample", "--prior", str(public_prior), "--num-images", "1", "--out", str(out),
                     "--scale", "2"]) == 0
    pngs = sorted(out.iterdir())
    assert len(pngs) == 2
    for png in pngs:
        settings = _parameters(png)
        assert settings["prior"] == public_prior.name and str(public_prior.parent) not in json.dumps(settings)


@pytest.mark.parametrize("save_prompt", [False, True])
def test_he_pngs_keep_the_prompt_and_seed_only_when_asked(tmp_path, capsys, save_prompt):
    out = tmp_path / "he"
    args = ["he", "sample", "--model", "tiny", "--prompt", "a secret prompt", "--negative-prompt", "hidden too",
            "--seed", "1234", "--steps", "1", "--out", str(out), *(["--save-prompt"] if save_prompt else [])]
    assert cli.main(args) == 0, capsys.readouterr().err
    (png,) = out.iterdir()
    settings = _parameters(png)
    with Image.open(png) as image:
        text = json.dumps(image.text)
    if save_prompt:
        assert (settings["prompt"], settings["negative_prompt"], settings["seed"]) == ("a secret prompt",
                                                                                        "hidden too", 1234)
    else:
        assert "secret" not in text and "hidden" not in text and "1234" not in text
        assert not {"prompt", "negative_prompt", "seed"} & set(settings)
    assert settings["steps"] == 1 and settings["packing"]


def test_prompt_settings_are_empty_unless_asked():
    from privdiff.io.image_output import file_name, prompt_settings

    assert prompt_settings("p", "n", 3, False) == {}
    assert prompt_settings("p", "n", 3, True) == {"prompt": "p", "negative_prompt": "n", "seed": 3}
    assert file_name("/home/me/private work/dp.safetensors") == "dp.safetensors" and file_name(None) is None
