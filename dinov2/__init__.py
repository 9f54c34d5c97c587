"""dinov2-cells: self-supervised DINOv2 pretraining and evaluation for white-blood-cell microscopy."""

__version__ = "0.1.0"
