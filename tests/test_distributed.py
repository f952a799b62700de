"""A release across ranks (torchrun's environment, gloo on CPU): the same release as one process, and failure
anywhere is failure everywhere (one line, no file, the ledger as it was).

The ranks are real ``python -m privdiff`` processes started with the environment torchrun gives its workers
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from privdiff.cli.main import main
from privdiff.demo.data import write_style_images
from privdiff.privacy.distributed import MAX_WORLD, World, shares
from privdiff.privacy.report import REPORT_KEY

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ["--model", "tiny", "--batch-size", "2", "--epsilon", "2", "--delta", "1e-3", "--public-size", "10",
           "--accountant", "rdp"]
PER_RUN = 120  # seconds a 2-rank run may take on a busy 2-core machine


@pytest.fixture
def images(tmp_path):
    return write_style_images(tmp_path / "private", count=5, size=32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list, size: int = 2, timeout: float = 60) -> list[subprocess.Popen]:
    """``python -m privdiff ARGS`` as ranks 0..size-1 of one world on this machine, as torchrun starts them."""
    port = _free_port()
    procs = []
    for rank in range(size):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(size),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PRIVDIFF_RANK_TIMEOUT": str(timeout),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "privdiff", *map(str, args)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=PER_RUN) for p in procs]
    return [(p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


def error_lines(results) -> list[str]:
    return [line for _, _, err in results for line in err.splitlines() if line.startswith("privdiff: error:")]


def _report(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[REPORT_KEY])


def _without_ids(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("release_id", "created", "committed", "reserved", "output",
                                                        "world_size")}


def _ledger_entries(path: Path) -> list[dict]:
    return [_without_ids(e) for e in json.loads(path.read_text())["releases"].values()]


def _wait_for(path: Path, procs: list[subprocess.Popen], seconds: float = PER_RUN) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end and all(p.poll() is None for p in procs), "the ranks never reserved"
        time.sleep(0.2)


def test_two_ranks_release_what_one_process_releases(tmp_path, images, capsys):
    args = ["ti-aggregate", "--images", images, *RELEASE, "--steps", "2", "--reproducible-seed", "7"]
    assert main([*map(str, args), "--out", str(tmp_path / "one.safetensors"), "--ledger",
                 str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    results = finish(start_ranks([*args, "--out", tmp_path / "two.safetensors", "--ledger", tmp_path / "two.json"]))
    assert [r[0] for r in results] == [0, 0], results
    assert json.loads(results[0][1])["world_size"] == 2 and results[1][1] == ""  # rank 0 alone prints the summary
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).abs().max() <= 1e-6  # the same release, to the rounding of the float64 sum
    report_one, report_two = _report(tmp_path / "one.safetensors"), _report(tmp_path / "two.safetensors")
    assert report_one["world_size"] == 1 and report_two["world_size"] == 2
    assert _without_ids(report_one) == _without_ids(report_two)
    assert _ledger_entries(tmp_path / "one.json") == _ledger_entries(tmp_path / "two.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "one.safetensors", "private", "two.json",
                                                          "two.safetensors"]  # no intermediates anywhere


def test_a_damaged_image_on_rank_1_is_reported_once(tmp_path, images):
    victim = sorted(images.iterdir())[-1]  # the last file: in rank 1's slice
    victim.write_bytes(victim.read_bytes()[:60])  # the header stays readable, the pixels are gone
    out, ledger = tmp_path / "o.safetensors", tmp_path / "ledger.json"
    results = finish(start_ranks(["ti-aggregate", "--images", images, *RELEASE, "--steps", "1", "--out", out,
                                  "--ledger", ledger]))
    assert [r[0] for r in results] == [2, 2], results
    lines = error_lines(results)
    assert len(lines) == 1 and lines[0].startswith("privdiff: error: rank 1:") and victim.name in lines[0], results
    assert "Traceback" not in results[0][2] + results[1][2]
    assert not out.exists() and not ledger.exists()  # the reservation was cancelled, and it had made the ledger


def test_a_killed_rank_ends_the_release_without_a_file(tmp_path, images):
    out, ledger = tmp_path / "o.safetensors", tmp_path / "ledger.json"
    procs = start_ranks(["ti-aggregate", "--images", images, *RELEASE, "--steps", "2000", "--out", out,
                         "--ledger", ledger])
    _wait_for(ledger, procs)
    time.sleep(2)
    procs[1].kill()
    results = finish(procs)
    assert results[0][0] == 2, results
    lines = error_lines(results[:1])
    assert len(lines) == 1 and "stopped" in lines[0], results
    assert not out.exists() and not ledger.exists()


def test_ctrl_c_ends_every_rank_without_a_file(tmp_path, images):
    out, ledger = tmp_path / "o.safetensors", tmp_path / "ledger.json"
    procs = start_ranks(["ti-aggregate", "--images", images, *RELEASE, "--steps", "2000", "--out", out,
                         "--ledger", ledger])
    _wait_for(ledger, procs)
    time.sleep(2)
    for p in procs:  # a terminal's Ctrl-C reaches every process of the job
        p.send_signal(signal.SIGINT)
    results = finish(procs)
    assert [r[0] for r in results] == [130, 130], results
    assert all("interrupted; no output written" in err for _, _, err in results)
    assert not out.exists() and not ledger.exists()


def test_bad_input_on_rank_0_ends_every_rank_with_one_line(tmp_path):
    results = finish(start_ranks(["ti-aggregate", "--images", tmp_path / "none", *RELEASE, "--out",
                                  tmp_path / "o.safetensors"]))
    assert [r[0] for r in results] == [2, 2], results
    assert len(error_lines(results)) == 1 and "none" in error_lines(results)[0]


def test_commands_that_run_in_one_process_refuse_ranks(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    command = ["ledger", "show", "--ledger", str(tmp_path / "l.json")]
    assert main(command) == 2
    assert "privdiff ledger runs in one process" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    assert main(command) == 2
    assert capsys.readouterr().err == ""  # rank 0 says it, once


@pytest.mark.parametrize(("variable", "value"), [("WORLD_SIZE", "two"), ("WORLD_SIZE", "5000"), ("RANK", "2"),
                                                 ("MASTER_PORT", "0"), ("PRIVDIFF_RANK_TIMEOUT", "nan")])
def test_a_bad_torchrun_environment_is_one_line(monkeypatch, capsys, tmp_path, images, variable, value):
    for name, default in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, default)
    monkeypatch.setenv(variable, value)
    assert main(["ti-aggregate", "--images", str(images), *RELEASE, "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("privdiff: error:") == 1 and variable in err, err


def test_a_lone_world_talks_to_no_one():
    world = World()
    assert world.leader and world.scatter(["mine"]) == "mine" and world.collect(lambda: 3) == [3]
    world.finish(None)
    assert world.device("cuda") == "cuda"


def test_shares_cover_the_records_once_in_near_equal_slices():
    for n in range(0, 40):
        for size in range(1, 9):
            parts = shares(n, size)
            assert [i for part in parts for i in part] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_the_distributed_sums_error_bound_holds_for_every_size_and_world():
    """docs/privacy.md: for n <= 100,000 records on W <= 1024 ranks, the summation tree's depth D satisfies
    (D + 1) n 2**-53 <= 0.91 * 2**-32 (rank sums of at most ceil(n / W) rows, then a tree over the W sums)."""
    n = np.arange(1, 100_001, dtype=np.int64)
    worst = 0.0
    for size in range(1, MAX_WORLD + 1):
        rows = -(-n // size)
        depth = np.ceil(np.log2(rows)).astype(np.int64) + (size - 1).bit_length()
        worst = max(worst, float(((depth + 1) * n).max()) / 2**21)
    assert worst <= 0.91


def _same_release(tmp_path, args: list, name: str) -> tuple[dict, dict]:
    """Run ``args`` in this process and on 2 ranks; return both files' tensors after checking their reports."""
    assert main([*map(str, args), "--out", str(tmp_path / f"one-{name}")]) == 0
    results = finish(start_ranks([*args, "--out", tmp_path / f"two-{name}"]))
    assert [r[0] for r in results] == [0, 0], results
    one, two = _report(tmp_path / f"one-{name}"), _report(tmp_path / f"two-{name}")
    assert (one["world_size"], two["world_size"]) == (1, 2) and _without_ids(one) == _without_ids(two)
    return load_file(tmp_path / f"one-{name}"), load_file(tmp_path / f"two-{name}")


def test_aggregate_and_style_targets_on_two_ranks_release_what_one_process_releases(tmp_path, images, capsys):
    import torch

    from privdiff.embeddings.files import Embedding, save_embedding

    folder = tmp_path / "per_image"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        save_embedding(Embedding({"clip_l": torch.randn(2, 768, generator=g) * 0.05}), folder / f"i{i}.safetensors")
    one, two = _same_release(tmp_path, ["aggregate", "--embeddings", folder, "--one-image-per-file",
                                        "--noise-multiplier", "2", "--delta", "1e-3", "--accountant", "rdp",
                                        "--public-size", "6", "--sample-rate", "0.6", "--reproducible-seed", "3"],
                             "agg.safetensors")
    assert (one["emb_params"] - two["emb_params"]).abs().max() <= 1e-6
    one, two = _same_release(tmp_path, ["guidance", "target", "--images", images, "--image-encoder", "tiny",
                                        "--epsilon", "2", "--delta", "1e-3", "--public-size", "10", "--accountant",
                                        "rdp", "--reproducible-seed", "3"], "target.safetensors")
    assert (one["target"] - two["target"]).abs().max() <= 1e-6
    capsys.readouterr()


def test_a_damaged_embedding_file_on_rank_1_is_reported_once(tmp_path):
    import torch

    from privdiff.embeddings.files import Embedding, save_embedding

    folder = tmp_path / "per_image"
    folder.mkdir()
    for i in range(4):
        save_embedding(Embedding({"clip_l": torch.zeros(1, 768)}), folder / f"i{i}.safetensors")
    save_embedding(Embedding({"clip_l": torch.zeros(2, 768)}), folder / "i9.safetensors")  # rank 1's slice
    results = finish(start_ranks(["aggregate", "--embeddings", folder, "--one-image-per-file", "--noise-multiplier",
                                  "2", "--delta", "1e-3", "--accountant", "rdp", "--public-size", "6", "--out",
                                  tmp_path / "agg.safetensors"]))
    assert [r[0] for r in results] == [2, 2], results
    lines = error_lines(results)
    assert len(lines) == 1 and lines[0].startswith("privdiff: error: rank 1:") and "i9.safetensors" in lines[0]
    assert not (tmp_path / "agg.safetensors").exists()


def test_dpsgd_on_two_ranks_releases_what_one_process_releases(tmp_path, images, capsys):
    """DP-SGD: rank 0 draws each step's Poisson batch over the whole dataset and adds the noise once; the ranks
    clip and sum their examples' gradients. With a seed, the embedding is the one process's."""
    one, two = _same_release(tmp_path, ["ti-aggregate", "--method", "dpsgd", "--images", images, "--model", "tiny",
                                        "--steps", "3", "--batch-size", "2", "--epsilon", "2", "--delta", "1e-3",
                                        "--accountant", "rdp", "--sample-rate", "0.6", "--reproducible-seed", "5"],
                             "dpsgd.safetensors")
    assert (one["emb_params"] - two["emb_params"]).abs().max() <= 1e-6
    capsys.readouterr()


def test_dp_lora_on_two_ranks_releases_what_one_process_releases(tmp_path, images, capsys):
    """DP-LoRA as DP-SGD TI: the same adapters on two ranks as in one process with the same seed."""
    one, two = _same_release(tmp_path, ["lora", "--images", images, "--model", "tiny", "--steps", "3",
                                        "--batch-size", "2", "--rank", "2", "--lr", "0.05", "--epsilon", "2",
                                        "--delta", "1e-3", "--accountant", "rdp", "--sample-rate", "0.6",
                                        "--reproducible-seed", "5"],
                             "lora.safetensors")
    assert one.keys() == two.keys() and all((one[k] - two[k]).abs().max() <= 1e-6 for k in one)
    assert any(one[k].abs().max() > 0 for k in one if k.endswith("lora_up.weight"))  # trained
    capsys.readouterr()


def test_wavelet_finetune_on_two_ranks_releases_what_one_process_releases(tmp_path, capsys):
    write_style_images(tmp_path / "public", count=12, size=32)
    write_style_images(tmp_path / "private", count=6, size=32)
    tok, prior = tmp_path / "tok.safetensors", tmp_path / "prior.safetensors"
    assert main(["wavelet", "tokenizer", "--images", str(tmp_path / "public"), "--out", str(tok),
                 "--codebook-size", "8"]) == 0
    assert main(["wavelet", "pretrain", "--tokenizer", str(tok), "--images", str(tmp_path / "public"), "--out",
                 str(prior), "--steps", "2", "--dim", "16", "--layers", "1", "--heads", "2"]) == 0
    one, two = _same_release(tmp_path, ["wavelet", "finetune", "--prior", prior, "--images", tmp_path / "private",
                                        "--epsilon", "10", "--delta", "1e-3", "--steps", "3", "--batch-size", "3",
                                        "--reproducible-seed", "4", "--checkpoint-dir", tmp_path / "ck"],
                             "dp.safetensors")
    assert one.keys() == two.keys() and all((one[k].float() - two[k].float()).abs().max() <= 1e-6 for k in one)
    assert not any((tmp_path / "ck").iterdir())  # the checkpoint, rank 0's alone, is gone once released
    capsys.readouterr()


def test_the_report_text_says_how_many_ranks_trained_it():
    import dataclasses

    from privdiff.app.release_options import report_text
    from privdiff.privacy.report import make_report

    report = make_report(mechanism="m", epsilon=1.0, delta=1e-5, noise_multiplier=1.0, sample_rate=1.0,
                         clip_norm=1.0, steps=1, accountant="rdp", relation="add-remove", public_size=10)
    assert "processes" not in report_text(report)
    assert "trained across 2 processes" in report_text(dataclasses.replace(report, world_size=2))
