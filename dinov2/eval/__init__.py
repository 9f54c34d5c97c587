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

from dinov2.utils.lazy import lazy_attributes

_LAZY = {
    "FeatureSet": "dinov2.eval.features",
    "Preprocessing": "dinov2.eval.features",
    "extract_features": "dinov2.eval.features",
    "load_eval_backbone": "dinov2.eval.backbones",
    "pool_tokens": "dinov2.eval.backbones",
    "knn_predict": "dinov2.eval.knn",
    "topk_neighbours": "dinov2.eval.knn",
    "LogisticRegressionConfig": "dinov2.eval.linear",
    "TorchLinearConfig": "dinov2.eval.linear",
    "logistic_regression_probe": "dinov2.eval.linear",
    "torch_linear_probe": "dinov2.eval.linear",
    "METRIC_NAMES": "dinov2.eval.metrics",
    "classification_metrics": "dinov2.eval.metrics",
    "confusion_matrix": "dinov2.eval.metrics",
    "per_class_report": "dinov2.eval.metrics",
    "ClassifierConfig": "dinov2.eval.protocols",
    "EvalResult": "dinov2.eval.protocols",
    "add_bootstrap": "dinov2.eval.protocols",
    "bootstrap_ci": "dinov2.eval.protocols",
    "cross_dataset_eval": "dinov2.eval.protocols",
    "cross_validate": "dinov2.eval.protocols",
    "stratified_kfold_indices": "dinov2.eval.folds",
    "train_val_test": "dinov2.eval.protocols",
    "markdown_table": "dinov2.eval.reports",
    "plot_confusion_matrix": "dinov2.eval.reports",
    "write_classification_outputs": "dinov2.eval.reports",
    "write_report": "dinov2.eval.reports",
    "plot_umap": "dinov2.eval.umap_view",
    "plot_umap_thumbnails": "dinov2.eval.umap_view",
    "save_coords_csv": "dinov2.eval.umap_view",
    "umap_embedding": "dinov2.eval.umap_view",
    "attention_to_patch_maps": "dinov2.eval.attention_maps",
    "compute_attention_maps": "dinov2.eval.attention_maps",
    "plot_attention_grid": "dinov2.eval.attention_maps",
    "save_attention_grids": "dinov2.eval.attention_maps",
    "sample_images_per_class": "dinov2.eval.selection",
}

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
