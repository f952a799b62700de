"""The DP Spectral Fine-tune front logic: a public spectral prior + private images -> a DP prior."""

from __future__ import annotations

from pathlib import Path

from privdiff.app.release_options import Release, ledger_request, report_text, target_path
from privdiff.errors import PrivdiffError
from privdiff.io.images import read_private_files
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.artifact import carries_release
from privdiff.release.dp_params import DPParams
from privdiff.wavelet.training import TrainConfig


def finetune_spectral(
    prior_file: str | Path,
    images: str | Path,
    release: Release,
    config: TrainConfig,
    priors_dir: Path,
    checkpoint_dir: Path,
    progress: Progress | None = None,
    default_ledger: Path | None = None,
    device: str = "cpu",
    checkpoint_every: int = 50,
) -> tuple[str, Path]:
    """DP Spectral Fine-tune: (report text, DP prior path ``priors_dir/<name>.safetensors``).

    Like the other releases, an identical earlier request whose file is still there is returned without
    training or charging again, unless ``new_release`` is set. Running the same request again after an
    interruption resumes it from ``checkpoint_dir`` (a private folder) without a second charge.
    """
    from privdiff.io.untrusted_tensors import file_digest
    from privdiff.wavelet.workflow import finetune_prior

    if release.public_size:
        raise PrivdiffError("public_size does not apply to DP-SGD fine-tuning: it treats N as public (add-remove)")
    path = target_path(priors_dir, release.name, kind="prior")
    if Path(prior_file).expanduser().resolve() == path.resolve():
        raise PrivdiffError(f"the DP prior {path.name} would overwrite the public prior it starts from; pick "
                            "another name")
    private = read_private_files(images)  # read once: the ledger charges the very bytes decoded
    params = DPParams(epsilon=release.epsilon or None, delta=release.delta, sample_rate=release.sample_rate,
                      clip_norm=release.clip_norm, bound=release.bound,
                      noise_multiplier=release.noise_multiplier or None)
    prior_digest = file_digest(prior_file, "prior")  # a FIFO or folder is refused, never read
    ledger = ledger_request(release, private.digests, default_ledger,
                     release.request(kind="spectral prior", prior=prior_digest, config=config.__dict__))
    if ledger is not None and not release.new_release and path.is_file():
        earlier = ledger.ledger.find(ledger.request)
        if earlier is not None and carries_release(path, earlier["release_id"]):
            report = PrivacyReport.from_metadata(_metadata(path))
            return (prior_text(report) + "\nnote: the same request was released before; returned without training "
                    "or charging the budget again (set new_release for a new one)"), path
    if path.exists() and not release.overwrite:
        raise PrivdiffError(f"{path} already exists; pick another name or enable overwrite")
    out, report, resumed = finetune_prior(
        prior_file, private, path, params, config, ledger=ledger, checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every, seed=release.seed(), dataset_label=release.label(), progress=progress,
        force=release.overwrite, device=device)
    text = prior_text(report)
    if resumed:
        text += "\nnote: resumed an interrupted fine-tune of the same request (charged once)"
    return text, out


def prior_text(report: PrivacyReport) -> str:
    return report_text(report) + "\nthe guarantee covers this prior; its samples and their upsampling are " \
                                 "post-processing (and the pre-training images must really be public)"


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
