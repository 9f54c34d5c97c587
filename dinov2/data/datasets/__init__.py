"""Datasets of cell images (DINOv2 keeps its datasets in this sub-package)."""

from dinov2.data.datasets.custom_image_datasets import (
    IMAGE_EXTENSIONS,
    CellImageDataset,
    find_images,
)

__all__ = ["CellImageDataset", "IMAGE_EXTENSIONS", "find_images"]
