"""A small trained classifier for the web-app tests, built in seconds on 2 CPU cores.

Synthetic stained cells (`dinov2.data.synthetic`) of three classes at 64 px, split 60/40 into
TRN/VAL, and a linear head (cached features) trained on a random-init ViT with 2 registers. The
accuracy does not matter; what matters is a real `best.pth` written by `dinov2-finetune`.
"""

import pytest
from serve_helpers import CLASSES, TrainedClassifier, tiny_vit_with_registers

from dinov2.data.split import split_dataset
from dinov2.data.synthetic import generate_synthetic_cells
from dinov2.models.weights import export_backbone
from dinov2.transfer.finetune import FinetuneConfig, train_classifier


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> TrainedClassifier:
    root = tmp_path_factory.mktemp("serve")
    generate_synthetic_cells(root / "cells", per_class=10, size=64, seed=0, classes=CLASSES, progress=False)
    split_dataset(root / "cells", root / "split", (0.6, 0.4, 0.0), seed=0, mode="copy")
    export_backbone(tiny_vit_with_registers(), root / "backbone.safetensors")
    cfg = FinetuneConfig(
        data=str(root / "split"), backbone=str(root / "backbone.safetensors"), output_dir=str(root / "run"),
        mode="linear", head="cls+avgpool", epochs=10, batch_size=6, lr=0.05, image_size=64,
        warmup_epochs=0.0, cache_features=True, num_workers=0, progress=False, device="cpu",
    )  # fmt: skip
    result = train_classifier(cfg)
    return TrainedClassifier(root, result.best_checkpoint, root / "split" / "TRN", root / "split" / "VAL")
