"""Training logs: JSON lines, a human-readable status line with ETA, and TensorBoard scalars.

Only the main process writes. `<output_dir>/training_metrics.jsonl` gets one JSON object per log step
(appended, so a resumed run continues the file); TensorBoard event files go to `<output_dir>/tensorboard`
when tensorboard is installed.

Usage:
    log = MetricsLogger(output_dir, total_iterations=1000, enabled=is_main_process())
    log.log(iteration, {"total_loss": 8.1, "lr": 1e-4, "iter_time": 0.3, ...})
    log.close()
"""

import datetime
import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("dinov2")

# Keys shown in the human line, in this order, when present.
_HUMAN_KEYS = ("total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss", "koleo_loss",
               "lr", "teacher_temp", "knn_accuracy")  # fmt: skip


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA max_memory_allocated on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def format_eta(seconds: float) -> str:
    """Seconds -> "H:MM:SS" (or "?" when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Write metrics of a log step to JSON lines, the console and TensorBoard.

    Args:
        output_dir: run folder (created if needed).
        total_iterations: iteration count of the whole run, for progress and ETA.
        enabled: False on non-main processes (nothing is written).
        tensorboard: write TensorBoard events when the package is importable.
    """

    def __init__(
        self, output_dir: str | Path, total_iterations: int, enabled: bool = True, tensorboard: bool = True
    ):
        self.total_iterations = total_iterations
        self.enabled = enabled
        self.path = Path(output_dir) / "training_metrics.jsonl"
        self._writer = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional (dev) dependency
                logger.info("tensorboard not installed: no event files")
            else:
                self._writer = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))

    def log(self, iteration: int, metrics: dict[str, Any], seconds_per_iteration: float | None = None) -> str:
        """Record `metrics` for `iteration` (1-based count of completed iterations); return the human line."""
        record = {"iteration": iteration, **{k: _jsonable(v) for k, v in metrics.items()}}
        record.setdefault("wall_time", round(time.time(), 3))  # seconds since the epoch: curves vs minutes
        remaining = self.total_iterations - iteration
        eta = format_eta(remaining * seconds_per_iteration) if seconds_per_iteration else "?"
        record["eta_seconds"] = round(remaining * seconds_per_iteration, 1) if seconds_per_iteration else None
        percent = 100.0 * iteration / max(self.total_iterations, 1)
        parts = [f"it {iteration}/{self.total_iterations} ({percent:.1f}%)"]
        for key in _HUMAN_KEYS:
            if key in record and isinstance(record[key], int | float):
                parts.append(f"{key} {record[key]:.4g}")
        if "images_per_second" in record:
            parts.append(f"{record['images_per_second']:.1f} img/s")
        phases = [
            (k, record.get(f"{k}_time")) for k in ("data", "forward_backward", "grad_sync", "optimizer")
        ]
        if all(isinstance(v, int | float) for _, v in phases):
            # The split of the last step, measured with the device synchronised between phases.
            parts.append("step " + " ".join(f"{k} {1000 * v:.0f}ms" for k, v in phases))
        if "peak_memory_mb" in record:
            parts.append(f"mem {record['peak_memory_mb']:.0f} MiB")
        parts.append(f"ETA {eta}")
        line = " | ".join(parts)
        if not self.enabled:
            return line
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "iteration" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, iteration)
            self._writer.flush()
        logger.info(line)
        return line

    def close(self) -> None:
        """Flush and close the TensorBoard writer."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
