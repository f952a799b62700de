"""Shared fixtures: tiny random-weight SD1/SDXL pipelines and their backends (built once per session)."""

import os
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models are latency-bound: intra-op threads only add overhead, and on a busy 2-core
# machine they made a tiny UNet call ~50x slower (spinning OpenMP workers).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd1():
    """Tiny SD1-like StableDiffusionPipeline (32px images, 4x8x8 latents, text width 768)."""
    from privdiff.models.tiny import tiny_pipeline

    return tiny_pipeline("sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl():
    """Tiny SDXL-like StableDiffusionXLPipeline (clip_l 768 + clip_g 1280)."""
    from privdiff.models.tiny import tiny_pipeline

    return tiny_pipeline("sdxl", seed=0)


@pytest.fixture(scope="session")
def sd1_backend(tiny_sd1):
    """Frozen DiffusersBackend over ``tiny_sd1``."""
    from privdiff.models.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(tiny_sd1)
    backend.freeze()
    return backend


@pytest.fixture(scope="session")
def sdxl_backend(tiny_sdxl):
    """Frozen DiffusersBackend over ``tiny_sdxl``."""
    from privdiff.models.diffusers_backend import DiffusersBackend

    backend = DiffusersBackend(tiny_sdxl)
    backend.freeze()
    return backend


@pytest.fixture
def he_worker():
    """HOST:PORT of a ``privdiff he worker`` server running in a thread."""
    from privdiff.he.protocol import WorkerServer

    server = WorkerServer(("127.0.0.1", 0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def public_prior(tmp_path_factory):
    """A tiny public spectral prior: 16 px, 3 scales of 16 tokens, codebooks of 16 codes, a one-block transformer
    of width 32, pre-trained a few steps on procedural public images."""
    from privdiff.reference.shapes import public_dataset
    from privdiff.wavelet.prior import PriorConfig, SpectralPrior, save_prior
    from privdiff.wavelet.tokenizer import fit_tokenizer
    from privdiff.wavelet.training import TrainConfig, pretrain

    images = torch.from_numpy(public_dataset(40, seed=0)[0]).permute(0, 3, 1, 2).float()
    tokenizer = fit_tokenizer(images, size=16, base=4, codebook_size=16, iterations=5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        prior = SpectralPrior(PriorConfig.for_tokenizer(tokenizer, dim=32, layers=1, heads=2))
    pretrain(prior, tokenizer.encode(images), TrainConfig(steps=5, batch_size=8, lr=1e-3))
    return save_prior(prior, tokenizer, tmp_path_factory.mktemp("public") / "public.safetensors")


@pytest.fixture
def fake_worker():
    """``fake_worker(answer, linger)``: HOST:PORT of a socket whose one connection reads the key holder's HELLO,
    lets ``answer(conn)`` reply, and stays open ``linger`` seconds more (a hostile or broken worker)."""
    import socket
    import time

    from privdiff.he.protocol import read_message

    def start(answer, linger: float) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                read_message(conn, 1 << 20, 10)
                answer(conn)
                time.sleep(linger)
            listener.close()

        threading.Thread(target=run, daemon=True).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    return start
