"""The DP Style Target front logic: private images -> a released style target for universal guidance."""

from __future__ import annotations

from pathlib import Path

from privdiff.app.release_options import Release, ledger_request, pixels_request, report_text, target_path
from privdiff.embeddings.dpagg import expected_snr
from privdiff.errors import PrivdiffError
from privdiff.guidance.target import load_target, make_target, plan_target, save_target, target_params
from privdiff.io.images import PrivateDataset
from privdiff.models.image_encoders import ImageEncoder
from privdiff.privacy.report import PrivacyReport
from privdiff.progress import Progress
from privdiff.release.artifact import carries_release, release_artifact
from privdiff.release.dp_params import check_params


def make_style_target(
    encoder: ImageEncoder,
    dataset: PrivateDataset,
    release: Release,
    targets_dir: Path,
    progress: Progress | None = None,
    default_ledger: Path | None = None,
) -> tuple[str, str]:
    """DP Style Target node: (report text, target name); writes ``targets_dir/<name>.safetensors``.

    Like the embedding nodes, an identical earlier request is returned without charging again unless
    ``new_release`` is set.
    """
    params = target_params(release.epsilon or None, release.delta, release.sample_rate,
                           public_size=release.public_size or None)
    check_params(params, len(dataset))
    path = target_path(targets_dir, release.name)
    ledger = ledger_request(release, dataset.digests, default_ledger,
                     release.request(kind="style target", encoder=encoder.identity, **pixels_request(dataset)))
    if ledger is not None and not release.new_release and path.is_file():
        earlier = ledger.ledger.find(ledger.request)
        if earlier is not None and carries_release(path, earlier["release_id"]):
            report = load_target(path).report
            return (target_text(report, encoder.identity) + "\nnote: the same request was released before; "
                    "returned without charging the budget again (set new_release for a new one)"), release.name
    if path.exists() and not release.overwrite:
        raise PrivdiffError(f"{path} already exists; pick another name or enable overwrite")
    report = plan_target(params, len(dataset), encoder.identity, seed=release.seed(), dataset_label=release.label())
    expected_snr(report.public_size, params.sample_rate, report.noise_multiplier, encoder.dim)  # warns before work
    release_artifact(
        lambda: make_target(encoder, dataset.images, params, seed=release.seed(), report=report, progress=progress),
        report, path, lambda target: save_target(target, path, force=release.overwrite), carries_release, ledger)
    return target_text(report, encoder.identity), release.name


def target_text(report: PrivacyReport, encoder: str) -> str:
    return report_text(report) + f"\nimage encoder: {encoder}\nthe guarantee covers the target; sampling " \
                                 "with it is post-processing and spends no budget"
