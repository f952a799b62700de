"""``privdiff aggregate``: the DP aggregate of per-image embedding files trained elsewhere."""

from __future__ import annotations

import argparse

from privdiff.cli import arguments, releasing
from privdiff.errors import PrivdiffError


def _cmd_aggregate(args: argparse.Namespace) -> None:
    from privdiff.embeddings.ranks import aggregate_embedding_files_ranks

    with releasing.joined_world(args) as world:
        if world.leader:
            with world.leading():
                path, result, reservation = _lead_aggregate(args, world)
            arguments.print_json(releasing.summary(path, result, reservation))
        else:
            aggregate_embedding_files_ranks(world)
            world.finish(None)


def _lead_aggregate(args: argparse.Namespace, world: object) -> tuple:
    from privdiff.embeddings.dpagg import aggregate_embedding_files, center_label, per_image_files, plan_files_release
    from privdiff.embeddings.files import load_embedding
    from privdiff.embeddings.ranks import aggregate_embedding_files_ranks
    from privdiff.embeddings.release import release_embedding
    from privdiff.io.images import list_images
    from privdiff.privacy.ledger import image_digests
    from privdiff.release.dp_params import check_params

    output = releasing.planned_output(args)
    if not args.one_image_per_file:
        raise PrivdiffError("the guarantee needs each file to come from exactly one image: confirm with "
                            "--one-image-per-file")
    files = per_image_files(args.embeddings)
    rate = 1.0 if args.sample_rate is None else args.sample_rate  # --sample-rate 0 is refused
    params = releasing.dp_params(args, rate, args.noise_multiplier)
    check_params(params, len(files))
    if args.ledger and not args.images:
        raise PrivdiffError("--ledger charges the images the embeddings were trained on: name their folder "
                            "with --images")
    sources = list_images(args.images) if args.images else []
    if sources and len(sources) != len(files):
        raise PrivdiffError(f"--images holds {len(sources)} images but --embeddings holds {len(files)} files; "
                            "they must correspond one to one")
    center = load_embedding(args.center) if args.center else None
    ledger = releasing.ledger_request(args, image_digests(sources) if args.ledger else [])  # never decoded: one read
    report = releasing.with_world(plan_files_release(params, len(files), center_label(args.center),
                                                     seed=args.reproducible_seed, dataset_label=args.dataset_label),
                                  world)

    def produce() -> object:
        if world.size > 1:
            return aggregate_embedding_files_ranks(world, files, params, center=center, seed=args.reproducible_seed,
                                                   report=report)
        return aggregate_embedding_files(files, params, center=center, seed=args.reproducible_seed, report=report)

    return release_embedding(produce, report, output, ledger)


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The ``aggregate`` command."""
    p = sub.add_parser("aggregate", help="DP aggregate of per-image embedding files trained elsewhere")
    add_arguments(p)
    p.set_defaults(func=_cmd_aggregate, across_ranks=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``aggregate``'s options (``privdiff audit aggregate`` takes them too)."""
    p.add_argument("--embeddings", required=True, help="folder of per-image embedding files")
    p.add_argument("--one-image-per-file", action="store_true",
                   help="confirm that every file was trained on exactly one image (required)")
    p.add_argument("--noise-multiplier", type=arguments.POSITIVE, default=None,
                   help="use this sigma and report its epsilon, instead of calibrating for --epsilon")
    p.add_argument("--center", default=None,
                   help="public embedding file the offsets are taken from (default: zero)")
    p.add_argument("--images", default=None,
                   help="folder of the images the files were trained on, one per file (needed with --ledger)")
    arguments.add_release_options(p, "1.0", epsilon_required=False)
