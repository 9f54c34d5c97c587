"""The first stage: image files in, tensors out.

- `datasets` (`CellImageDataset`), `files` (which files are images), `image_io` (decoding);
- `scan` + `scan_cache` (`dinov2-scan`: find undecodable files), `synthetic` (`dinov2-synth`),
  `split` (`dinov2-split`: stratified TRN/VAL/TST folders);
- `augmentations`, `transforms`, `masking`, `collate`, `samplers`, `loaders`: the pretraining batch.
"""
