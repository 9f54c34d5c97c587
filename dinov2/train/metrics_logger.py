"""Training logs: JSON lines, a human-readable status line with ETA, and TensorBoard scalars.

Only the main process writes. `<output_dir>/training_metrics.jsonl` gets one JSON object per log step
(appended, so a resumed run continues the file); TensorBoard event files go to `<output_dir>/tensorboard`
when tensorboard is installed.

Step timing lives here too: the loop reports each step's data wait and total wall time with
`step_done`, and the next `log` writes their means over the steps since the previous log line
(`iter_time`, `data_time`, `images_per_second`) with the peak memory, and derives the ETA from them.
The loop synchronises the device at log steps, so a window's time is the device's too.

Usage:
    log = MetricsLogger(output_dir, total_iterations=1000, enabled=is_main_process(),
                        images_per_step=global_batch, device=device)
    log.step_done(data_seconds=0.01, step_seconds=0.3)      # every iteration
    log.log(iteration, {"total_loss": 8.1, "lr": 1e-4, ...})  # at log steps
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
        images_per_step: images of one iteration over all processes (for images_per_second).
        device: the training device (its peak memory is logged).
    """

    def __init__(
        self,
        output_dir: str | Path,
        total_iterations: int,
        enabled: bool = True,
        tensorboard: bool = True,
        images_per_step: int | None = None,
        device: torch.device | None = None,
    ):
        self.total_iterations = total_iterations
        self.enabled = enabled
        self.images_per_step = images_per_step
        self.device = device
        self._window = [0.0, 0.0, 0]  # step seconds, data seconds, steps since the last log line
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

    def step_done(self, data_seconds: float, step_seconds: float) -> None:
        """Count one iteration: `data_seconds` waiting for the loader, `step_seconds` in all."""
        self._window[0] += step_seconds
        self._window[1] += data_seconds
        self._window[2] += 1

    def window_timing(self) -> dict[str, float]:
        """Mean timing of the steps since the last log line (and reset it); empty when none."""
        step_s, data_s, n = self._window
        self._window = [0.0, 0.0, 0]
        if n == 0:
            return {}
        out = {"iter_time": step_s / n, "data_time": data_s / n}
        if self.images_per_step:
            out["images_per_second"] = self.images_per_step * n / step_s if step_s > 0 else float("inf")
        return out

    def log(self, iteration: int, metrics: dict[str, Any]) -> str:
        """Record `metrics` for `iteration` (1-based count of completed iterations); return the human line.

        The timing of the steps counted by `step_done` since the last line is added (and gives the
        ETA), with the device's peak memory.
        """
        timing = self.window_timing()
        seconds_per_iteration = timing.get("iter_time")
        if self.device is not None:
            timing["peak_memory_mb"] = peak_memory_mb(self.device)
        record = {"iteration": iteration, **{k: _jsonable(v) for k, v in {**metrics, **timing}.items()}}
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
