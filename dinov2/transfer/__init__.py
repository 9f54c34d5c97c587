"""Supervised transfer: a classifier on a DINOv2 backbone, its training and its predictions.

- `classifier`: the model (backbone + linear head), its preprocessing, optimiser groups and the
  self-contained checkpoint format (``best.pth``);
- `config`, `loop`, `outputs`, `finetune`: `dinov2-finetune` (its settings, the epoch loop, what a
  run writes, and `train_classifier` with the command line);
- `predictions`, `infer`: a `Prediction` per file, the predictions CSV, and `dinov2-infer`.

The data split they start from (`dinov2-split`) is `dinov2.data.split`. The names below are
imported lazily on first access, so ``import dinov2.transfer`` stays cheap.

Example::

    from dinov2.transfer import FinetuneConfig, predict, train_classifier
    result = train_classifier(FinetuneConfig(data="split", backbone="w.pth", output_dir="out"))
    predictions = predict(result.best_checkpoint, "new_cells/")
"""

from dinov2.utils.lazy import by_module, lazy_attributes

_LAZY = by_module(
    {
        "dinov2.transfer.classifier": ("BackboneClassifier", "load_classifier"),
        "dinov2.transfer.config": ("FinetuneConfig", "FinetuneResult"),
        "dinov2.transfer.finetune": ("train_classifier",),
        "dinov2.transfer.predictions": ("Prediction", "write_predictions_csv"),
        "dinov2.transfer.infer": ("predict",),
    }
)

__all__ = sorted(_LAZY)
__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)
