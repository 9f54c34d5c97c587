"""Evaluation of frozen embeddings: features, k-NN, linear probes, protocols, reports, UMAP and
attention maps. Supervised transfer (a trained classifier: `dinov2-finetune`, `dinov2-infer`) is
`dinov2.transfer`; the train/val/test split (`dinov2-split`) is `dinov2.data.split`.

The names below are imported lazily on first access, so ``import dinov2.eval.<module>`` stays
cheap (umap-learn, matplotlib and scikit-learn load only when used).

Example::

    from dinov2.eval import extract_features, cross_validate, write_report
    fs = extract_features("dinov2_vits14_reg:weights.pth", "data/pbc", cache_dir="cache")
    result = cross_validate(fs, n_folds=5)
    write_report(result, "out/cv", paths=fs.paths)
"""

from dinov2.utils.lazy import by_module, lazy_attributes

_LAZY = by_module(
    {
        "dinov2.eval.features": ("FeatureSet", "Preprocessing", "extract_features"),
        "dinov2.eval.backbones": ("load_eval_backbone", "pool_tokens"),
        "dinov2.eval.knn": ("knn_predict", "topk_neighbours"),
        "dinov2.eval.linear": (
            "LogisticRegressionConfig",
            "TorchLinearConfig",
            "logistic_regression_probe",
            "torch_linear_probe",
        ),
        "dinov2.eval.metrics": (
            "METRIC_NAMES",
            "classification_metrics",
            "confusion_matrix",
            "per_class_report",
        ),
        "dinov2.eval.protocols": (
            "ClassifierConfig",
            "EvalResult",
            "add_bootstrap",
            "bootstrap_ci",
            "cross_dataset_eval",
            "cross_validate",
            "train_val_test",
        ),
        "dinov2.eval.folds": ("stratified_kfold_indices",),
        "dinov2.eval.reports": (
            "markdown_table",
            "plot_confusion_matrix",
            "write_classification_outputs",
            "write_report",
        ),
        "dinov2.eval.umap_view": ("plot_umap", "plot_umap_thumbnails", "save_coords_csv", "umap_embedding"),
        "dinov2.eval.attention_maps": (
            "attention_to_patch_maps",
            "compute_attention_maps",
            "plot_attention_grid",
            "save_attention_grids",
        ),
        "dinov2.eval.selection": ("sample_images_per_class",),
    }
)

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
