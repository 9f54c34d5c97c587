"""``dinov2-eval``: evaluate a frozen backbone on labeled cell-image folders.

Subcommands (each has ``-h``)::

    dinov2-eval features  --backbone B --data DIR [DIR ...] --output feats.npz
    dinov2-eval cv        --backbone B --data DIR --output-dir OUT [--folds 5] [--k 1 20]
    dinov2-eval knn       --backbone B --train DIR --test DIR --output-dir OUT [--k 1 20]
    dinov2-eval linear    --backbone B --train DIR [--val DIR] --test DIR --output-dir OUT
    dinov2-eval umap      --backbone B --data DIR --output-dir OUT
    dinov2-eval attention --backbone B --images IMG [IMG ...] --output-dir OUT

B is a checkpoint file (Meta's release, a teacher export, a training checkpoint), a hub name
(``dinov2_vits14_reg``: random weights; ``dinov2_vits14_reg:WEIGHTS.pth``), or a baseline
(``pixels:32`` = raw pixels pooled to 32x32, ``colorstats`` = 6 colour statistics). Instead of
``--backbone`` + data, ``--features FILE.npz`` (from ``dinov2-eval features``) reuses features.
``knn`` / ``linear`` with ``--class-mapping`` run the cross-dataset protocol (train classes mapped
to test classes). Features are cached in ``--cache-dir`` (default ``OUT/feature_cache``).
Bad input (missing checkpoint, unlabeled folder, too few images per class) exits with status 2
and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dinov2.eval.backbones import POOLINGS

PROG = "dinov2-eval"


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------


def _add_backbone_args(p: argparse.ArgumentParser, *, features_alternative: bool = True) -> None:
    g = p.add_argument_group("backbone and preprocessing")
    g.add_argument(
        "--backbone",
        help="checkpoint path, hub name (dinov2_vits14_reg[:WEIGHTS]), pixels:S or colorstats",
    )
    g.add_argument("--pooling", choices=POOLINGS, default="cls", help="token pooling (default: cls)")
    g.add_argument("--n-last-blocks", type=int, default=1, help="pool each of the last n blocks (default: 1)")
    g.add_argument("--image-size", type=int, default=224, help="centre-crop side, multiple of the patch size")
    g.add_argument(
        "--resize-size", type=int, default=None, help="short side before cropping (default: image size)"
    )
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--cache-dir", default=None, help="feature cache folder (default: OUTPUT/feature_cache)")
    g.add_argument("--max-per-class", type=int, default=None, help="seeded subsample of each class")
    g.add_argument("--seed", type=int, default=0, help="subsampling, folds and random-init seed")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if features_alternative:
        g.add_argument(
            "--features",
            nargs="+",
            default=None,
            metavar="NPZ",
            help="reuse files from 'dinov2-eval features' instead of --backbone + folders",
        )


def _add_classifier_args(p: argparse.ArgumentParser, *, default_ks=(1, 20), default_linear="sklearn") -> None:
    g = p.add_argument_group("classifiers")
    g.add_argument(
        "--k", type=int, nargs="*", default=list(default_ks), help=f"k-NN rows (default: {default_ks})"
    )
    g.add_argument("--vote", choices=("majority", "weighted", "both"), default="majority", help="k-NN vote")
    g.add_argument("--temperature", type=float, default=0.07, help="weighted-vote temperature")
    g.add_argument(
        "--linear", choices=("sklearn", "torch", "none"), default=default_linear, help="linear probe kind"
    )
    g.add_argument(
        "--C", type=float, nargs="+", default=[0.01, 0.1, 1.0, 10.0], help="logistic-regression C grid"
    )
    g.add_argument("--inner-folds", type=int, default=3, help="inner CV folds choosing C (no validation set)")
    g.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations")
    g.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1], help="torch probe lr grid")
    g.add_argument(
        "--wd", type=float, nargs="+", default=[0.0, 1e-4, 1e-2], help="torch probe weight-decay grid"
    )
    g.add_argument("--epochs", type=int, default=100, help="torch probe epochs")
    g.add_argument("--scoring", default="balanced_accuracy", help="metric maximised when choosing C / lr")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("features", help="extract and save features (.npz)", description="Extract features.")
    _add_backbone_args(p, features_alternative=False)
    p.add_argument("--data", nargs="+", required=True, help="image folder(s)")
    p.add_argument("--output", required=True, help="output .npz")
    p.add_argument("--unlabeled", action="store_true", help="folders need no class sub-folders")

    p = sub.add_parser(
        "cv", help="stratified k-fold CV table (1-NN, 20-NN, Linear Probing)", description="k-fold CV."
    )
    _add_backbone_args(p)
    p.add_argument("--data", nargs="+", help="labeled image folder(s), one sub-folder per class")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    p.add_argument("--n-boot", type=int, default=0, help="bootstrap intervals on the pooled predictions")
    _add_classifier_args(p)

    for name, help_, ks, linear in (
        ("knn", "k-NN on a train folder, scored on a test folder", (1, 20), "none"),
        ("linear", "linear probe: C on val, refit on train+val, scored on test", (), "sklearn"),
    ):
        p = sub.add_parser(name, help=help_, description=help_ + ".")
        _add_backbone_args(p)
        p.add_argument("--train", nargs="+", help="labeled training folder(s)")
        p.add_argument(
            "--val", nargs="+", default=None, help="labeled validation folder(s) (default: hold out)"
        )
        p.add_argument("--test", nargs="+", help="labeled test folder(s)")
        p.add_argument("--output-dir", required=True)
        p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction when no --val")
        p.add_argument(
            "--n-boot", type=int, default=1000, help="bootstrap resamples for 95%% intervals (0: none)"
        )
        p.add_argument("--class-mapping", default=None, help="train->test class names (JSON or CSV pairs)")
        _add_classifier_args(p, default_ks=ks, default_linear=linear)

    p = sub.add_parser(
        "umap", help="UMAP coloured by class, thumbnails view, coordinates CSV", description="UMAP."
    )
    _add_backbone_args(p)
    p.add_argument("--data", nargs="+", help="image folder(s)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--n-neighbors", type=int, default=15)
    p.add_argument("--min-dist", type=float, default=0.1)
    p.add_argument("--thumbnails", type=int, default=400, help="max thumbnails drawn (0: no thumbnail view)")
    p.add_argument("--thumb-size", type=int, default=32)

    p = sub.add_parser(
        "attention", help="CLS / register attention grids per image", description="Attention maps."
    )
    _add_backbone_args(p, features_alternative=False)
    p.add_argument("--images", nargs="*", default=[], help="image files")
    p.add_argument("--data", default=None, help="or pick --n-images per class from this folder")
    p.add_argument("--n-images", type=int, default=1, help="images per class with --data")
    p.add_argument("--output-dir", required=True)
    return parser


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _features(args, roots, *, labeled=True, output_dir=None):
    from dinov2.eval.features import extract_features

    if not args.backbone:
        raise ValueError("give --backbone (a checkpoint, hub name, pixels:S or colorstats)")
    if not roots:
        raise ValueError("give the image folder(s)")
    cache = args.cache_dir or (str(Path(output_dir) / "feature_cache") if output_dir else None)
    return extract_features(
        args.backbone,
        roots,
        pooling=args.pooling,
        n_last_blocks=args.n_last_blocks,
        image_size=args.image_size,
        resize_size=args.resize_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        cache_dir=cache,
        max_images_per_class=args.max_per_class,
        seed=args.seed,
        labeled=labeled,
        progress=not args.no_progress,
    )


def _load_feature_files(files):
    from dinov2.eval.features import FeatureSet

    return [FeatureSet.load(f) for f in files]


def _classifier_config(args):
    from dinov2.eval.linear import LogisticRegressionConfig, TorchLinearConfig
    from dinov2.eval.protocols import ClassifierConfig

    return ClassifierConfig(
        ks=tuple(args.k or ()),
        knn_vote=args.vote,
        temperature=args.temperature,
        linear=args.linear,
        logreg=LogisticRegressionConfig(
            Cs=tuple(args.C),
            inner_folds=args.inner_folds,
            scoring=args.scoring,
            max_iter=args.max_iter,
            seed=args.seed,
        ),
        torch_linear=TorchLinearConfig(
            lrs=tuple(args.lr),
            weight_decays=tuple(args.wd),
            epochs=args.epochs,
            scoring=args.scoring,
            seed=args.seed,
            device=args.device,
        ),
        device=args.device,
    )


def _describe(args, fs) -> dict:
    return {
        "command": " ".join([PROG] + list(args.argv)),
        "backbone": getattr(args, "backbone", None),
        "features_meta": fs.meta,
    }


def _status(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"[{PROG}] {msg}", file=sys.stderr, flush=True)


def _finish(result, out: Path, fs, args, caption: str) -> None:
    from dinov2.eval.reports import markdown_table, write_report

    write_report(result, out, paths=fs.paths, extra=_describe(args, fs), caption=caption)
    print(markdown_table(result.summary()), end="")
    print(f"results written to {out}")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def cmd_features(args) -> None:
    fs = _features(args, args.data, labeled=None if args.unlabeled else True, output_dir=None)
    path = fs.save(args.output)
    print(f"{len(fs)} images, {fs.features.shape[1]}-d features, {len(fs.class_names)} classes -> {path}")


def cmd_cv(args) -> None:
    from dinov2.eval.protocols import add_bootstrap, cross_validate

    out = Path(args.output_dir)
    t0 = time.perf_counter()
    if args.features:
        (fs,) = _load_feature_files(args.features[:1])
    else:
        _status("extracting features", args.no_progress)
        fs = _features(args, args.data, output_dir=out)
    _status(f"{len(fs)} images, {fs.features.shape[1]}-d features; {args.folds}-fold CV", args.no_progress)
    result = cross_validate(
        fs,
        n_folds=args.folds,
        seed=args.seed,
        classifiers=_classifier_config(args),
        progress=not args.no_progress,
    )
    if args.n_boot:
        add_bootstrap(result, n_boot=args.n_boot, seed=args.seed)
    result.info["total_seconds"] = round(time.perf_counter() - t0, 2)
    _finish(result, out, fs, args, caption=f"{args.folds}-fold CV: mean +/- std over folds")


def cmd_holdout(args) -> None:
    from dinov2.eval.protocols import cross_dataset_eval, train_val_test

    out = Path(args.output_dir)
    cfg = _classifier_config(args)
    if args.features:
        sets = _load_feature_files(args.features)
        if len(sets) not in (2, 3):
            raise ValueError("--features takes TRAIN.npz [VAL.npz] TEST.npz")
        train, test = sets[0], sets[-1]
        val = sets[1] if len(sets) == 3 else None
    else:
        if not args.train or not args.test:
            raise ValueError("give --train and --test folders (or --features TRAIN.npz [VAL.npz] TEST.npz)")
        _status("extracting features", args.no_progress)
        train = _features(args, args.train, output_dir=out)
        test = _features(args, args.test, output_dir=out)
        val = _features(args, args.val, output_dir=out) if args.val else None
    if args.class_mapping is not None:
        if val is not None:
            train = _concat(train, val)
        result = cross_dataset_eval(
            train, test, mapping=args.class_mapping, classifiers=cfg, n_boot=args.n_boot
        )
    else:
        result = train_val_test(
            train,
            test,
            val,
            classifiers=cfg,
            val_fraction=args.val_fraction,
            seed=args.seed,
            n_boot=args.n_boot,
        )
    _finish(result, out, test, args, caption=f"{args.command} on the test set")


def _concat(a, b):
    import numpy as np

    from dinov2.eval.features import FeatureSet

    if a.class_names != b.class_names:
        raise ValueError(f"train and val classes differ: {a.class_names} vs {b.class_names}")
    return FeatureSet(
        np.concatenate([a.features, b.features]),
        np.concatenate([a.labels, b.labels]),
        a.class_names,
        a.paths + b.paths,
    )


def cmd_umap(args) -> None:
    from dinov2.eval.umap_view import plot_umap, plot_umap_thumbnails, save_coords_csv, umap_embedding

    out = Path(args.output_dir)
    if args.features:
        (fs,) = _load_feature_files(args.features[:1])
    else:
        fs = _features(args, args.data, labeled=None, output_dir=out)
    _status(f"UMAP of {len(fs)} points (numba compiles on first use)", args.no_progress)
    coords = umap_embedding(fs.features, args.seed, n_neighbors=args.n_neighbors, min_dist=args.min_dist)
    written = [
        save_coords_csv(
            coords, out / "umap_coords.csv", paths=fs.paths, labels=fs.labels, class_names=fs.class_names
        ),
        plot_umap(coords, fs.labels, fs.class_names, out / "umap.png"),
    ]
    if args.thumbnails:
        written.append(
            plot_umap_thumbnails(
                coords,
                fs.paths,
                out / "umap_thumbnails.png",
                n_max=args.thumbnails,
                thumb_size=args.thumb_size,
                labels=fs.labels if fs.is_labeled else None,
                class_names=fs.class_names,
                seed=args.seed,
            )
        )
    for w in written:
        print(w)


def cmd_attention(args) -> None:
    from dinov2.eval.attention_maps import save_attention_grids
    from dinov2.eval.selection import sample_images_per_class

    if not args.backbone:
        raise ValueError("give --backbone (a ViT checkpoint or hub name)")
    images = list(args.images)
    if args.data:
        images += sample_images_per_class(args.data, per_class=args.n_images, seed=args.seed)
    if not images:
        raise ValueError("give --images FILE ... or --data DIR")
    for p in save_attention_grids(
        args.backbone,
        images,
        args.output_dir,
        image_size=args.image_size,
        resize_size=args.resize_size,
        device=args.device,
        seed=args.seed,
    ):
        print(p)


COMMANDS = {
    "features": cmd_features,
    "cv": cmd_cv,
    "knn": cmd_holdout,
    "linear": cmd_holdout,
    "umap": cmd_umap,
    "attention": cmd_attention,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``dinov2-eval``; returns 0, exits 2 with a message on bad input."""
    parser = get_args_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"{PROG} {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
