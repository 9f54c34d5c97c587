"""The model behind the web app: one classifier, one lock, no gradients.

`ClassifierService.predict` takes uploaded files (name + bytes) and returns, per file in upload
order, the class probabilities, the attention of the CLS and register tokens over the image and
the nearest reference cells; a file that cannot be decoded gets its own error and nothing else.

Predictions equal `dinov2-infer`'s: files are decoded by the same `dinov2.data.image_io.load_rgb`
(written to a private temporary folder first, since it reads paths), preprocessed by the
checkpoint's own eval transform and classified by the same `BackboneClassifier` forward, with the
same error text (the temporary path replaced by the uploaded name). The backbone runs once per
batch: a forward hook keeps the last block's normalised input, from which the attention
probabilities follow with one extra q·k product (what `get_last_self_attention` computes with a
second pass).

Concurrency: decoding runs in the caller's thread; the model runs under a lock (the forward hook
and the model are shared), inside `torch.inference_mode()`.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dinov2.eval.attention_maps import attention_to_patch_maps
from dinov2.eval.features import Preprocessing
from dinov2.serve.overlay import attention_overlays
from dinov2.serve.retrieval import Neighbour, ReferenceIndex
from dinov2.transfer.classifier import BackboneClassifier, load_classifier, make_eval_transform
from dinov2.transfer.predictions import Prediction
from dinov2.utils.device import autocast_for, resolve_device


@dataclass(frozen=True)
class Upload:
    """One uploaded file."""

    filename: str
    data: bytes


@dataclass
class ImageResult:
    """Everything the page shows for one file."""

    prediction: Prediction
    """Class probabilities (``path`` is the uploaded file name), or the decoding error."""
    attention: dict[str, object] | None = None
    """``{"cls": PNG data URL, "registers": [PNG data URL, ...]}``; None for an error."""
    neighbours: list[Neighbour] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        p = self.prediction
        return {
            "filename": p.path,
            "predicted_class": p.predicted_class,
            "probability": p.probability,
            "probabilities": p.probabilities,
            "error": p.error,
            "attention": self.attention,
            "neighbours": [n.to_json() for n in self.neighbours],
        }


@dataclass
class _Decoded:
    index: int
    tensor: torch.Tensor
    """Normalised model input [3, S, S]."""
    crop: np.ndarray
    """The same crop as uint8 [S, S, 3], for the overlays."""


def _safe_suffix(filename: str) -> str:
    """The file's extension if it is plain (letters and digits), else nothing."""
    suffix = Path(filename).suffix
    return suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix) else ""


def describe_backbone(model: BackboneClassifier) -> str:
    """One line naming the architecture and head, e.g. "ViT-S/14 (width 384, depth 12, 4 registers,
    22.06 M parameters), 'cls+avgpool' linear head"."""
    b = model.backbone
    size = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1536: "ViT-g"}.get(int(b.embed_dim), "ViT")
    n_params = sum(p.numel() for p in b.parameters())
    return (
        f"{size}/{b.patch_size} (width {b.embed_dim}, depth {b.n_blocks}, {b.num_register_tokens} registers, "
        f"{n_params / 1e6:.2f} M parameters), {model.pooling!r} linear head"
    )


class ClassifierService:
    """A loaded classifier that predicts uploads (thread-safe).

    Args:
        model: the classifier (eval mode, on its device); see `load_classifier`.
        classes: class names in head order.
        prep: the checkpoint's evaluation preprocessing.
        model_name: what `/api/health` reports as "model" (the checkpoint path).
        reference: nearest-neighbour index, or None.
        batch_size: images per forward pass.
        neighbours: reference cells returned per image.
    """

    def __init__(
        self,
        model: BackboneClassifier,
        classes: Sequence[str],
        prep: Preprocessing,
        *,
        model_name: str = "",
        reference: ReferenceIndex | None = None,
        batch_size: int = 32,
        neighbours: int = 8,
    ):
        if batch_size < 1 or neighbours < 1:
            raise ValueError(f"need batch_size >= 1 and neighbours >= 1, got {batch_size}, {neighbours}")
        patch = model.backbone.patch_size
        if prep.image_size % patch:
            raise ValueError(f"image size {prep.image_size} is not a multiple of the patch size {patch}")
        self.model = model.eval()
        self.classes = list(classes)
        self.prep = prep
        self.model_name = model_name
        self.reference = reference
        self.batch_size = batch_size
        self.neighbours = neighbours
        self.device = next(model.parameters()).device
        self._transform = make_eval_transform(prep)
        self._crop = prep.crop()
        self._lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        model_path: str | os.PathLike,
        *,
        device: str = "auto",
        reference: str | os.PathLike | None = None,
        reference_features: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        reference_max_per_class: int | None = None,
        batch_size: int = 32,
        progress: bool = True,
    ) -> ClassifierService:
        """Load ``best.pth`` and, optionally, a reference set: a labeled folder (``reference``,
        embedded with the feature cache under ``cache_dir``) or a saved `FeatureSet`
        (``reference_features``), not both."""
        if reference is not None and reference_features is not None:
            raise ValueError("give either a reference folder or a reference feature file, not both")
        dev = resolve_device(device)
        model, classes, prep = load_classifier(model_path, dev)
        index = None
        if reference is not None:
            if not Path(reference).is_dir():
                raise FileNotFoundError(f"reference folder not found: {reference}")
            index = ReferenceIndex.from_folder(
                model,
                prep,
                reference,
                cache_dir=cache_dir,
                max_per_class=reference_max_per_class,
                batch_size=batch_size,
                device=dev,
                progress=progress,
            )
        elif reference_features is not None:
            index = ReferenceIndex.from_file(reference_features, model)
        return cls(
            model, classes, prep, model_name=os.fspath(model_path), reference=index, batch_size=batch_size
        )

    # ------------------------------------------------------------------------------------------

    def health(self) -> dict[str, object]:
        return {
            "model": self.model_name,
            "classes": self.classes,
            "backbone": describe_backbone(self.model),
            "device": str(self.device),
            "reference_size": len(self.reference) if self.reference is not None else 0,
            "image_size": self.prep.image_size,
            "registers": int(self.model.backbone.num_register_tokens),
        }

    def predict(self, uploads: Sequence[Upload]) -> list[ImageResult]:
        """One `ImageResult` per upload, in order; undecodable files get ``prediction.error``."""
        results: list[ImageResult | None] = [None] * len(uploads)
        decoded: list[_Decoded] = []
        with tempfile.TemporaryDirectory(prefix="dinov2-serve-") as tmp:
            for i, up in enumerate(uploads):
                item = self._decode(i, up, Path(tmp))
                if isinstance(item, str):
                    results[i] = ImageResult(Prediction(up.filename, None, None, None, error=item))
                else:
                    decoded.append(item)
        for start in range(0, len(decoded), self.batch_size):
            chunk = decoded[start : start + self.batch_size]
            probs, embeddings, maps = self._run_model(torch.stack([d.tensor for d in chunk]))
            hits = self.reference.search(embeddings, self.neighbours) if self.reference is not None else None
            for j, d in enumerate(chunk):
                results[d.index] = ImageResult(
                    Prediction.from_probs(uploads[d.index].filename, probs[j], self.classes),
                    attention=attention_overlays(d.crop, maps[j]),
                    neighbours=hits[j] if hits is not None else [],
                )
        return [r for r in results if r is not None]

    def reference_thumbnail(self, index: int, size: int = 96) -> bytes:
        """PNG of reference cell ``index``, at most ``size`` px on a side.

        Raises:
            LookupError: no reference set, or ``index`` out of range. ValueError / OSError: the
            file is gone or unreadable (a feature file made on another machine).
        """
        from PIL import Image

        from dinov2.data.image_io import load_rgb

        if self.reference is None or not 0 <= index < len(self.reference):
            raise LookupError(f"no reference image {index}")
        image = load_rgb(self.reference.paths[index])
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    # ------------------------------------------------------------------------------------------

    def _decode(self, index: int, upload: Upload, tmp: Path) -> _Decoded | str:
        """The model input and crop of one upload, or the error text `dinov2-infer` would print."""
        from dinov2.data.image_io import load_rgb

        path = tmp / f"upload-{index}{_safe_suffix(upload.filename)}"
        path.write_bytes(upload.data)
        try:
            image = load_rgb(path)
            tensor = self._transform(image)
            crop = np.asarray(self._crop(image), dtype=np.uint8)
        except (ValueError, OSError) as e:  # ImageDecodeError is a ValueError
            return f"{type(e).__name__}: {e}".replace(str(path), upload.filename)
        finally:
            path.unlink(missing_ok=True)
        return _Decoded(index, tensor, crop)

    def _run_model(self, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """(softmax probabilities [B, K] float64, head-input embeddings [B, D], attention maps
        [B, 1 + R, H, gh, gw]) of a normalised batch."""
        backbone = self.model.backbone
        last = backbone.iter_blocks()[-1]
        captured: list[torch.Tensor] = []
        grid = (images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size)
        with self._lock, torch.inference_mode():
            handle = last.norm1.register_forward_hook(lambda _m, _i, out: captured.append(out))
            try:
                with autocast_for(self.device):
                    embeddings = self.model.features(images.to(self.device))
                    logits = self.model.head(embeddings)
            finally:
                handle.remove()
            if len(captured) != 1:
                raise RuntimeError(f"expected one pass through the last block, saw {len(captured)}")
            attention = last.attn.attention_probs(captured[0])
            maps = attention_to_patch_maps(attention, backbone.num_register_tokens, grid)
            probs = torch.softmax(logits.float(), dim=1)
        return probs.cpu().numpy().astype(np.float64), embeddings.float().cpu(), maps.float().cpu()
