"""`privdiff ti-aggregate` and `privdiff aggregate` from the command line: output, errors, ledger."""

import json

import pytest
import torch
from PIL import Image

from privdiff.cli.main import main
from privdiff.demo.data import write_style_images
from privdiff.embeddings.files import Embedding, load_embedding, save_embedding

# RDP calibrates a q=1 release in milliseconds; PLD (the default) takes seconds at larger epsilons. RDP serves
# the add-remove relation only, which a declared public size gives.
FAST = ["--model", "tiny", "--steps", "1", "--batch-size", "8", "--epsilon", "2", "--delta", "1e-3",
        "--public-size", "10", "--accountant", "rdp"]
DEFAULT_ACCOUNTANT = FAST[:-4]


@pytest.fixture
def images(tmp_path):
    return write_style_images(tmp_path / "private", count=5, size=32)


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("privdiff: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_release_writes_only_the_embedding_with_its_report(tmp_path, images, capsys):
    # mixed modes and sizes are converted
    Image.new("RGBA", (40, 24), (10, 200, 30, 128)).save(images / "rgba.png")
    Image.new("L", (20, 50), 77).save(images / "gray.png")
    Image.new("P", (33, 33)).save(images / "palette.gif")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, out, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(out_dir / "s.safetensors"),
                         *DEFAULT_ACCOUNTANT, "--dataset-label", "unit")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["epsilon"] == 2.0 and summary["private"] is True
    assert summary["relation"] == "replace-one" and summary["public_size"] == 8  # N is public under replace-one
    assert summary["accountant"] == "pld"
    assert [p.name for p in out_dir.iterdir()] == ["s.safetensors"]  # no per-image intermediates
    code, out, _ = run(capsys, "embedding", "inspect", str(out_dir / "s.safetensors"))
    report = json.loads(out)["privacy_report"]
    assert report["dataset_label"] == "unit" and report["release_id"] == summary["release_id"]


def test_a1111_pt_output_gets_a_sidecar(tmp_path, images, capsys):
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "s.pt"), *FAST)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["s.pt", "s.pt.privacy.json"]


@pytest.mark.parametrize(("change", "needle"), [
    (["--epsilon", "0"], "argument --epsilon: must be a finite number > 0, got 0"),
    (["--epsilon", "-1"], "argument --epsilon: must be a finite number > 0, got -1"),
    (["--delta", "0.5"], "delta 0.5"),
])
def test_impossible_budgets_are_refused(tmp_path, images, capsys, change, needle):
    target = tmp_path / "s.safetensors"
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(target), *FAST, *change)
    assert code == 2 and needle in one_line_error(err)
    assert not target.exists()


def test_bad_folders_and_images_name_the_file(tmp_path, images, capsys):
    target = tmp_path / "s.safetensors"
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, "ti-aggregate", "--images", str(tmp_path / "empty"), "--out", str(target), *FAST)
    assert code == 2 and "holds no images" in one_line_error(err)
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(target), *FAST)
    assert code == 2 and "broken.jpg" in one_line_error(err)
    assert not target.exists()


def test_existing_output_needs_force(tmp_path, images, capsys):
    target = tmp_path / "s.safetensors"
    target.write_bytes(b"keep me")
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(target), *FAST)
    assert code == 2 and "already exists" in one_line_error(err)
    assert target.read_bytes() == b"keep me"


def test_reproducible_seed_repeats_and_is_marked_not_private(tmp_path, images, capsys):
    outputs = []
    for name, seed in [("a", "3"), ("b", "3"), ("c", None)]:
        extra = ["--reproducible-seed", seed] if seed else []
        code, out, err = run(capsys, "ti-aggregate", "--images", str(images), "--out",
                             str(tmp_path / f"{name}.safetensors"), *FAST, *extra)
        assert code == 0, err
        assert json.loads(out)["private"] is (seed is None)
        outputs.append(load_embedding(tmp_path / f"{name}.safetensors").vectors["clip_l"])
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_ledger_composes_and_refuses_over_budget(tmp_path, images, capsys):
    ledger = str(tmp_path / "owner" / "ledger.json")
    (tmp_path / "owner").mkdir()
    spent = []
    for name in ["one", "two"]:
        code, out, err = run(capsys, "ti-aggregate", "--images", str(images), "--out",
                             str(tmp_path / f"{name}.safetensors"), *FAST, "--ledger", ledger,
                             "--budget-epsilon", "3.5")
        assert code == 0, err
        spent.append(json.loads(out)["ledger"]["largest_image_epsilon"])
    # calibrated to at most 2 (σ=1.609); RDP composes two such releases (q=1) to 3.03, under 2+2, and a third
    # would reach 3.87 > 3.5
    # (the ledger rounds sigma down to 3 digits before composing: slightly above the release's own 2.0)
    assert 1.99 <= spent[0] <= 2.05 and 3.0 < spent[1] < 3.1
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "three.safetensors"),
                       *FAST, "--ledger", ledger)
    assert code == 2 and "refused" in one_line_error(err)
    assert not (tmp_path / "three.safetensors").exists()
    code, out, err = run(capsys, "ti-aggregate", "--images", str(images), "--out",
                         str(tmp_path / "three.safetensors"), *FAST, "--ledger", ledger, "--force-budget")
    assert code == 0, err
    releases = json.loads((tmp_path / "owner" / "ledger.json").read_text())["releases"]
    assert [r["forced"] for r in releases.values()] == [False, False, True]
    more = write_style_images(tmp_path / "more", count=6, size=32)  # the same 5 images and a new one
    code, _, err = run(capsys, "ti-aggregate", "--images", str(more), "--out", str(tmp_path / "four.safetensors"),
                       *FAST, "--ledger", ledger)
    assert code == 2 and "refused" in one_line_error(err)
    code, _, err = run(capsys, "ti-aggregate", "--images", str(more), "--out", str(tmp_path / "four.safetensors"),
                       *FAST, "--ledger", ledger, "--budget-epsilon", "100")
    assert code == 2 and "--change-budget" in one_line_error(err)


def test_interrupted_run_leaves_no_file_and_no_ledger_entry(tmp_path, images, capsys, monkeypatch):
    import privdiff.embeddings.dpagg as dpagg

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dpagg, "train_embeddings", interrupted)
    ledger = tmp_path / "ledger.json"
    target = tmp_path / "s.safetensors"
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(target), *FAST,
                       "--ledger", str(ledger), "--budget-epsilon", "20")
    assert code == 130 and "no output written" in err
    assert list(tmp_path.glob("*.safetensors*")) == [] and list(tmp_path.glob(".*.tmp")) == []
    assert not ledger.exists()  # the run had created it; cancelling its reservation removed it again


def test_aggregate_command(tmp_path, capsys):
    folder = tmp_path / "per_image"
    folder.mkdir()
    for i in range(6):
        save_embedding(Embedding({"clip_l": torch.randn(2, 768) * 0.05}), folder / f"i{i}.safetensors")
    target = tmp_path / "agg.safetensors"
    code, _, err = run(capsys, "aggregate", "--embeddings", str(folder), "--out", str(target), "--epsilon", "4",
                       "--delta", "1e-3")
    assert code == 2 and "--one-image-per-file" in one_line_error(err)
    code, out, err = run(capsys, "aggregate", "--embeddings", str(folder), "--out", str(target), "--one-image-per-file",
                         "--noise-multiplier", "2", "--delta", "1e-3", "--accountant", "rdp", "--public-size", "6")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["noise_multiplier"] == 2.0 and summary["accountant"] == "rdp" and summary["epsilon"] > 0
    assert load_embedding(target).vectors["clip_l"].shape == (2, 768)


def test_few_images_warn_with_the_signal_to_noise_ratio(tmp_path, capsys, caplog):
    images = write_style_images(tmp_path / "private", count=3, size=32)
    code, out, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "s.safetensors"),
                         *FAST)
    assert code == 0, err
    snr = 10 / (json.loads(out)["noise_multiplier"] * 768**0.5)  # q * public size over sigma * sqrt(d)
    assert json.loads(out)["expected_snr_best_case"] == round(snr, 3)
    assert f"signal-to-noise ratio of the release is {snr:.2f}" in caplog.text


@pytest.mark.parametrize(("change", "needle"), [
    (["--sample-rate", "0"], "argument --sample-rate: must be a finite number > 0 and <= 1, got 0"),
    (["--sample-rate", "1.5"], "argument --sample-rate: must be a finite number > 0 and <= 1, got 1.5"),
    (["--delta", "0.2"], "delta 0.2 must be in (0, 1/N)"),  # 1/N = 1/5
    (["--budget-delta", "0", "--ledger", "LEDGER", "--budget-epsilon", "3"],
     "argument --budget-delta: must be a finite number > 0 and < 1, got 0"),
    (["--steps", "0"], "argument --steps: must be an integer from 1 to 1000000, got 0"),
])
def test_bad_values_are_named_and_nothing_is_written(tmp_path, images, capsys, change, needle):
    target = tmp_path / "out" / "s.safetensors"
    target.parent.mkdir()
    change = [str(tmp_path / "ledger.json") if c == "LEDGER" else c for c in change]
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(target), *FAST, *change)
    assert code == 2 and needle in one_line_error(err)
    assert list(target.parent.iterdir()) == []


def test_cancel_from_the_progress_callback(tmp_path, images, capsys, monkeypatch):
    """The CLI's progress bar is the cancel point: KeyboardInterrupt there leaves nothing behind."""
    from contextlib import contextmanager

    import privdiff.progress

    calls = []

    @contextmanager
    def cancelling(description):
        def progress(done, total):
            calls.append(done)
            if len(calls) == 2:
                raise KeyboardInterrupt

        yield progress

    monkeypatch.setattr(privdiff.progress, "tqdm_progress", cancelling)
    ledger = tmp_path / "owner" / "ledger.json"
    ledger.parent.mkdir()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(out_dir / "s.safetensors"),
                       *FAST, "--steps", "3", "--ledger", str(ledger), "--budget-epsilon", "5")
    assert code == 130 and "interrupted" in err and len(calls) == 2
    assert list(out_dir.iterdir()) == [] and list(ledger.parent.iterdir()) == []


def test_aggregate_reports_the_accountants_epsilon_and_names_a_bad_file(tmp_path, capsys):
    from privdiff.privacy.accountants import epsilon_for

    folder = tmp_path / "per_image"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        vectors = {"clip_l": torch.randn(1, 768, generator=g) * 0.05}
        save_embedding(Embedding(vectors), folder / f"i{i}.pt", fmt="a1111-pt")
    target = tmp_path / "agg.safetensors"
    common = ["aggregate", "--embeddings", str(folder), "--one-image-per-file", "--delta", "1e-3",
              "--accountant", "prv", "--public-size", "40", "--out", str(target)]
    code, out, err = run(capsys, *common, "--noise-multiplier", "1.5", "--sample-rate", "0.5")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["epsilon"] == pytest.approx(epsilon_for(1.5, 0.5, 1, 1e-3, accountant="prv")[1], rel=1e-9)
    assert summary["sample_rate"] == 0.5 and summary["public_size"] == 40 and summary["relation"] == "add-remove"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["agg.safetensors"]
    save_embedding(Embedding({"clip_h": torch.zeros(1, 1024)}), folder / "z_wide.safetensors")
    code, _, err = run(capsys, *common, "--noise-multiplier", "1.5", "--force")
    assert code == 2 and "z_wide.safetensors" in one_line_error(err)
    code, _, err = run(capsys, "aggregate", "--embeddings", str(tmp_path / "none"), "--one-image-per-file",
                       "--delta", "1e-3", "--epsilon", "1", "--out", str(tmp_path / "x.safetensors"))
    assert code == 2 and "none" in one_line_error(err)


def test_aggregate_charges_the_source_images_in_the_same_ledger(tmp_path, images, capsys):
    ledger = str(tmp_path / "ledger.json")
    code, out, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "a.safetensors"),
                         *FAST, "--ledger", ledger, "--budget-epsilon", "3.5")
    assert code == 0, err
    first = json.loads(out)["ledger"]["largest_image_epsilon"]
    folder = tmp_path / "per_image"
    folder.mkdir()
    for i in range(5):
        save_embedding(Embedding({"clip_l": torch.randn(1, 768) * 0.05}), folder / f"i{i}.safetensors")
    common = ["aggregate", "--embeddings", str(folder), "--one-image-per-file", "--epsilon", "2", "--delta", "1e-3",
              "--public-size", "10", "--accountant", "rdp", "--ledger", ledger,
              "--out", str(tmp_path / "b.safetensors")]
    code, _, err = run(capsys, *common)
    assert code == 2 and "--images" in one_line_error(err)
    code, out, err = run(capsys, *common, "--images", str(images))
    assert code == 0, err
    assert json.loads(out)["ledger"]["largest_image_epsilon"] > first  # composed with the ti-aggregate release


def test_ledger_refusals_come_before_the_model_loads(tmp_path, images, capsys, monkeypatch):
    import privdiff.models.registry

    ledger = str(tmp_path / "ledger.json")
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "a.safetensors"),
                       *FAST, "--ledger", ledger, "--budget-epsilon", "2.5")
    assert code == 0, err

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the ledger refused")

    monkeypatch.setattr(privdiff.models.registry, "load_model", no_model)
    for extra, needle in [([], "release refused"), (["--budget-epsilon", "9"], "--change-budget"),
                          (["--epsilon", "20000"], "epsilon")]:
        args = [*FAST, "--ledger", ledger, *extra]
        code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "b.safetensors"),
                           *args)
        assert code == 2 and needle in one_line_error(err), err
    assert not (tmp_path / "b.safetensors").exists()


def test_ledger_options_are_checked(tmp_path, images, capsys):
    out = tmp_path / "o.safetensors"
    for args, needle in [(["--budget-delta", "1e-4"], "need --ledger"),
                         (["--ledger", str(tmp_path / "l.json"), "--budget-delta", "1e-4"], "give both"),
                         (["--ledger", str(out), "--force"], "keep the ledger elsewhere")]:
        code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(out), *FAST, *args)
        assert code == 2 and needle in one_line_error(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private"]


def test_a_failed_commit_says_the_file_is_released_and_clear_refuses_it(tmp_path, images, capsys, monkeypatch):
    from privdiff.errors import PrivdiffError
    from privdiff.privacy.ledger import BudgetLedger

    ledger = tmp_path / "ledger.json"

    def locked(self, release_id):
        raise PrivdiffError(f"ledger {self.path} is locked by another run")

    monkeypatch.setattr(BudgetLedger, "commit", locked)
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "a.safetensors"),
                       *FAST, "--ledger", str(ledger), "--budget-epsilon", "5")
    assert code == 2 and "was written" in one_line_error(err) and "do not clear it" in err
    assert (tmp_path / "a.safetensors").exists()
    monkeypatch.undo()
    (release_id,) = json.loads(ledger.read_text())["releases"]
    code, _, err = run(capsys, "ledger", "clear", "--ledger", str(ledger), release_id)
    assert code == 2 and "it was released" in one_line_error(err)
    (tmp_path / "a.safetensors").unlink()  # the user deleted the file before anyone saw it
    code, out, err = run(capsys, "ledger", "clear", "--ledger", str(ledger), release_id)
    assert code == 0 and json.loads(out)["cleared"] == release_id


def test_a_model_name_too_long_for_the_filesystem_is_one_line(tmp_path, images, capsys):
    code, _, err = run(capsys, "ti-aggregate", "--images", str(images), "--out", str(tmp_path / "a.safetensors"),
                       *FAST, "--model", "m" * 300)
    assert code == 2 and "--model" in one_line_error(err) and "Traceback" not in err
