"""Encrypted denoising steps (privdiff.he): selection, CKKS roles, protocol, samplers, the worker's leak."""

import json
import math
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from privdiff.errors import PrivdiffError
from privdiff.he import steps
from privdiff.he.ckks import CKKSParams, KeyHolder, Worker
from privdiff.he.leak import psnr, reconstruct
from privdiff.he.protocol import (
    MAGIC,
    UPDATE,
    LocalWorker,
    Message,
    RemoteWorker,
    decode,
    encode,
    read_message,
)
from privdiff.he.sampler import HEConfig, sample
from privdiff.he.selection import hill_cost, select
from privdiff.he.stepper import EncryptedStepper

STEP_ERROR = 1e-6  # CKKS error per step with the default parameters (measured about 1e-9)


@pytest.fixture(scope="module")
def holder():
    return KeyHolder()


def _latent(seed=0, shape=(1, 4, 16, 16)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- selection ------------------------------------------------------------------------------------------------

def _reflect_conv(x, weight):
    pad = weight.shape[-1] // 2
    return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), weight)


def test_hill_cost_reference_filters_span_the_channels():
    """The released code's kernels are [C, C, k, k]: each output sums every input channel's filtering."""
    z = _latent(1, (2, 4, 20, 20))
    high = torch.tensor([[-1.0, 2, -1], [2, -4, 2], [-1, 2, -1]], dtype=torch.float64).repeat(4, 4, 1, 1)
    m3 = _reflect_conv(_reflect_conv(z, high).abs(), torch.ones(4, 4, 3, 3, dtype=torch.float64) / 9)
    m4 = torch.where(m3 == 0, 0.0, 1 / m3)
    want = _reflect_conv(m4, torch.ones(4, 4, 15, 15, dtype=torch.float64) / 225)
    torch.testing.assert_close(hill_cost(z, "reference"), want, rtol=1e-9, atol=1e-12)
    separate = hill_cost(z, "separate")
    assert not torch.allclose(separate[:, 0], separate[:, 1])  # each channel its own map


def test_selection_is_the_greedy_smallest_distortion_rule():
    z = _latent(2, (2, 4, 12, 12))
    for threshold in (0.0, 0.01, 0.2):
        mask = select(z, threshold)
        for b in range(2):
            d = (z[b].abs() * hill_cost(z[b:b + 1])[0]).flatten().tolist()
            budget, plain, total = threshold * sum(d), set(), 0.0
            for i in sorted(range(len(d)), key=lambda i: d[i]):
                if total + d[i] > budget:
                    break
                total += d[i]
                plain.add(i)
            want = torch.tensor([i not in plain for i in range(len(d))]).view(4, 12, 12)
            assert torch.equal(mask[b], want)
    assert select(z, 0.0).all() and 0.5 < select(z, 0.01).float().mean() < 1


@pytest.mark.parametrize("threshold", [-0.1, 1.0, float("nan"), True])
def test_threshold_outside_zero_one_is_refused(threshold):
    with pytest.raises(PrivdiffError, match=r"threshold must be in \[0, 1\)"):
        select(_latent(), threshold)


# -- CKKS roles -----------------------------------------------------------------------------------------------

def test_worker_context_has_no_secret_key_and_cannot_decrypt(holder):
    worker = Worker(holder.public_context())
    assert holder.context.is_private() and not worker.context.is_private()
    blob = holder.encrypt(np.arange(5.0))[0].serialize()
    with pytest.raises(ValueError, match="secret"):
        worker.load(blob).decrypt()
    with pytest.raises(PrivdiffError, match="secret key"):
        Worker(holder.context.serialize(save_secret_key=True))


@pytest.mark.parametrize(("params", "fragment"), [
    (CKKSParams(8192, (60, 60, 60, 60), 40), "over the 128-bit security limit of 218"),
    (CKKSParams(8192, (60, 60), 58), "leaves no room for values"),
    (CKKSParams(1000, (60, 60), 40), "poly modulus degree 1000"),
    (CKKSParams.reference(), "lose precision"),
])
def test_unusable_parameters_are_refused_with_the_reason(params, fragment):
    with pytest.raises(PrivdiffError, match=fragment):
        KeyHolder(params)


def test_values_the_modulus_cannot_hold_are_refused(holder):
    with pytest.raises(PrivdiffError, match="do not fit the CKKS parameters"):
        holder.encrypt(np.array([1.0, holder.params.capacity * 2]))


# -- one step -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("packing", "encrypt_offsets"), [("sparse", False), ("dense", False), ("dense", True)])
def test_encrypted_step_matches_the_plaintext_step(holder, packing, encrypt_offsets):
    z, eps = _latent(3), _latent(4)
    update = steps.ddim(eps, 0.3, 0.4)
    stepper = EncryptedStepper(holder, LocalWorker(holder.public_context()), 0.01, packing,
                               encrypt_offsets=encrypt_offsets)
    out = stepper(z, update)
    assert (out - update.apply(z)).abs().max() < STEP_ERROR
    assert stepper.stats.fraction == (1.0 if packing == "dense" else pytest.approx(0.88, abs=0.08))


def test_nothing_selected_gives_the_plaintext_step_exactly(holder):
    """A flat latent has zero HILL cost, so zero distortion: nothing is encrypted and the result is exact."""
    z = torch.full((1, 4, 8, 8), 0.7, dtype=torch.float64)
    update = steps.ddim(_latent(5, (1, 4, 8, 8)), 0.3, 0.4)
    stepper = EncryptedStepper(holder, LocalWorker(holder.public_context()), 0.0, "sparse", encrypt_offsets=False)
    assert torch.equal(stepper(z, update), update.apply(z)) and stepper.stats.encrypted == 0


def test_a_step_to_sigma_zero_sends_nothing(holder):
    link = LocalWorker(holder.public_context())
    denoised = _latent(6)
    out = EncryptedStepper(holder, link)(_latent(7), steps.euler(denoised, 1.5, 0.0))
    assert torch.equal(out, denoised) and link.sent == 0


# -- samplers -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", ["ddim", "plms", "euler"])
def test_encrypted_samplers_match_the_plaintext_sampler(sd1_backend, holder, sampler):
    cond = sd1_backend.encode_text(["a photo"] * 2)
    uncond = sd1_backend.encode_text([""] * 2)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    config = HEConfig(steps=6, cfg=3.0, sampler=sampler)
    plain = sample(sd1_backend, cond, uncond, latents, config, lambda z, u: u.apply(z))
    stepper = EncryptedStepper(holder, LocalWorker(holder.public_context()))
    seen = []
    encrypted = sample(sd1_backend, cond, uncond, latents, config, stepper, progress=lambda i, n: seen.append(i))
    # per-step CKKS error <= 1e-6 (measured ~1e-9), carried through 6 steps of factor <= ~1.1 and the UNet
    assert (encrypted - plain).abs().max() < 6 * STEP_ERROR * 10
    assert seen == list(range(1, 7)) and stepper.stats.steps == 6


def test_sampler_settings_are_checked():
    for kwargs, fragment in [({"sampler": "lms"}, "sampler='lms'"), ({"packing": "coo"}, "packing='coo'"),
                             ({"threshold": 1.5}, "threshold"), ({"steps": 0}, "steps"), ({"cfg": -1.0}, "cfg")]:
        with pytest.raises(PrivdiffError, match=fragment):
            HEConfig(**kwargs)


# -- the worker's view ----------------------------------------------------------------------------------------

def _run_recorded(backend, holder, sampler, packing, encrypt_offsets):
    cond, uncond = backend.encode_text(["a photo"]), backend.encode_text([""])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    view = []
    stepper = EncryptedStepper(holder, LocalWorker(holder.public_context(), record=view), 0.01, packing,
                               encrypt_offsets=encrypt_offsets)
    final = sample(backend, cond, uncond, latents, HEConfig(steps=8, cfg=3.0, sampler=sampler), stepper)
    return view, final.double().numpy().ravel()


def test_the_worker_rebuilds_euler_results_from_plain_offsets(sd1_backend, holder):
    """Euler's offsets are (1 - sigma'/sigma) x the model's denoised prediction: in plaintext they give the
    result away; encrypted and densely packed, the worker's estimate is no better than guessing zero."""
    view, final = _run_recorded(sd1_backend, holder, "euler", "sparse", False)
    x_final = final / math.sqrt(float(sd1_backend.alphas_cumprod[0]))  # the stepper's state is x = z / sqrt(a)
    estimate, exact = reconstruct(view, final.size)
    assert psnr(estimate, x_final) > 40
    view, final = _run_recorded(sd1_backend, holder, "euler", "dense", True)
    x_final = final / math.sqrt(float(sd1_backend.alphas_cumprod[0]))
    estimate, exact = reconstruct(view, final.size)
    assert not exact.any() and psnr(estimate, x_final) <= psnr(np.zeros_like(x_final), x_final) + 1
    assert all(len(r.plain) == 0 and len(r.offsets) == 0 and len(r.indices) == 0 for r in view)


def test_sparse_packing_shows_the_plaintext_remainder_and_its_positions(sd1_backend, holder):
    view, final = _run_recorded(sd1_backend, holder, "ddim", "sparse", False)
    estimate, exact = reconstruct(view, final.size)
    assert exact.any() and np.allclose(estimate[exact], final[exact], atol=1e-5)  # tracked exactly once seen


# -- two processes --------------------------------------------------------------------------------------------

def test_two_roles_over_loopback_match_one_process(holder, he_worker):
    z, update = _latent(8), steps.ddim(_latent(9), 0.5, 0.6)
    remote = RemoteWorker(he_worker, holder.public_context())
    far = EncryptedStepper(holder, remote)(z, update)
    near = EncryptedStepper(holder, LocalWorker(holder.public_context()))(z, update)
    assert (far - update.apply(z)).abs().max() < STEP_ERROR and (far - near).abs().max() < STEP_ERROR
    assert remote.sent > 100_000 and remote.received > 100_000
    remote.close()


TRUNCATED = MAGIC + bytes([UPDATE]) + (10).to_bytes(8, "little") + b"{}"


@pytest.mark.parametrize("payload", [b"GET / HTTP/1.0\r\n\r\n" + bytes(20), TRUNCATED])
def test_the_worker_refuses_a_malformed_message(he_worker, payload):
    host, port = he_worker.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reply, _ = read_message(sock)
    assert reply.kind == 5 and ("malformed" in reply.error or "closed" in reply.error)


def test_messages_are_checked_before_use():
    good = encode(Message(UPDATE, {"factor": 0.5}, {"offsets": np.ones(2), "plain": np.ones(1),
                                                    "plain_offsets": np.ones(1), "indices": np.arange(2)},
                          {"ciphertexts": [b"ab"], "offset_ciphertexts": []}))
    assert decode(UPDATE, good[13:]).floats["factor"] == 0.5
    for body, fragment in [(good[13:-1], "runs past the message"), (good[13:] + b"x", "unexpected bytes"),
                           (good[13:17] + b"{", "malformed message"), (b"", "malformed message")]:
        with pytest.raises(PrivdiffError, match=fragment):
            decode(UPDATE, body)
    nan = encode(Message(UPDATE, {"factor": 0.5}, {"offsets": np.array([np.nan]), "plain": np.ones(0),
                                                   "plain_offsets": np.ones(0), "indices": np.arange(0)},
                         {"ciphertexts": [], "offset_ciphertexts": []}))
    with pytest.raises(PrivdiffError, match="NaN"):
        decode(UPDATE, nan[13:])


def test_an_unreachable_or_garbage_worker_is_one_line(holder):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(PrivdiffError, match=f"the worker at 127.0.0.1:{port} is unreachable"):
        RemoteWorker(f"127.0.0.1:{port}", holder.public_context())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer_garbage():
        conn, _ = listener.accept()
        conn.recv(1 << 20)
        conn.sendall(b"hello, I am not a worker" * 3)
        conn.close()

    threading.Thread(target=answer_garbage, daemon=True).start()
    with pytest.raises(PrivdiffError, match="answered with a bad message"):
        RemoteWorker(f"127.0.0.1:{listener.getsockname()[1]}", holder.public_context())
    listener.close()
    with pytest.raises(PrivdiffError, match="is not HOST:PORT"):
        RemoteWorker("localhost", holder.public_context())


def test_cli_worker_and_key_holder_in_two_processes(tmp_path):
    worker = subprocess.Popen([sys.executable, "-m", "privdiff.cli", "he", "worker", "--listen", "127.0.0.1:0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or lines[-1].strip() != "}":
            lines.append(worker.stdout.readline())
            assert lines[-1], "the worker exited before listening"
        address = json.loads("".join(lines))["listening"]
        done = subprocess.run([sys.executable, "-m", "privdiff.cli", "he", "sample", "--model", "tiny", "--prompt",
                               "a photo", "--out", str(tmp_path / "out"), "--steps", "3", "--worker", address,
                               "--packing", "dense", "--encrypt-offsets"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert len(summary["images"]) == 1 and (tmp_path / "out").is_dir()
        assert any(f"worker at {address}" in line for line in summary["report"])
        bad = subprocess.run([sys.executable, "-m", "privdiff.cli", "he", "sample", "--model", "tiny", "--prompt", "x",
                              "--out", str(tmp_path / "bad"), "--threshold", "1.2"], capture_output=True, text=True)
        assert bad.returncode != 0 and "must be a number in [0, 1)" in bad.stderr and not (tmp_path / "bad").exists()
        worker.terminate()
        worker.wait(timeout=30)
        gone = subprocess.run([sys.executable, "-m", "privdiff.cli", "he", "sample", "--model", "tiny", "--prompt",
                               "x", "--out", str(tmp_path / "gone"), "--worker", address], capture_output=True,
                              text=True, timeout=120)
        assert gone.returncode != 0 and f"the worker at {address} is unreachable" in gone.stderr
        assert len(gone.stderr.strip().splitlines()) == 1 and not (tmp_path / "gone").exists()
    finally:
        worker.terminate()
        worker.wait(timeout=30)
