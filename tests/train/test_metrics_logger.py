"""MetricsLogger: step timing averaged over the window since the last line, ETA, JSON lines."""

import json

import pytest
import torch

from dinov2.train.metrics_logger import MetricsLogger, format_eta


def test_timing_window_means_eta_and_reset(tmp_path):
    log = MetricsLogger(tmp_path, total_iterations=10, tensorboard=False, images_per_step=8,
                        device=torch.device("cpu"))  # fmt: skip
    for data_s, step_s in ((0.1, 1.0), (0.2, 2.0), (0.3, 3.0)):
        log.step_done(data_seconds=data_s, step_seconds=step_s)
    line = log.log(3, {"total_loss": 5.0})
    first = json.loads((tmp_path / "training_metrics.jsonl").read_text().splitlines()[0])
    # Means over the 3 steps: 6 s / 3 and 0.6 s / 3; 24 images in 6 s; 7 steps left at 2 s each.
    assert first["iter_time"] == pytest.approx(2.0) and first["data_time"] == pytest.approx(0.2)
    assert first["images_per_second"] == pytest.approx(4.0)
    assert first["eta_seconds"] == pytest.approx(14.0) and "ETA 0:00:14" in line and "4.0 img/s" in line
    assert first["peak_memory_mb"] > 0 and first["total_loss"] == 5.0 and first["iteration"] == 3
    # The window starts again after a line; a line without counted steps has no timing.
    log.step_done(data_seconds=0.0, step_seconds=0.5)
    assert log.window_timing() == {"iter_time": 0.5, "data_time": 0.0, "images_per_second": 16.0}
    log.log(4, {"total_loss": 4.0})
    second = json.loads((tmp_path / "training_metrics.jsonl").read_text().splitlines()[1])
    assert "iter_time" not in second and second["eta_seconds"] is None
    log.close()


def test_only_the_main_process_writes_and_eta_format(tmp_path):
    log = MetricsLogger(tmp_path / "other_rank", total_iterations=5, enabled=False, tensorboard=False)
    log.step_done(0.0, 1.0)
    assert "ETA 0:00:04" in log.log(1, {"total_loss": 1.0})
    assert not (tmp_path / "other_rank").exists()
    assert format_eta(3725.9) == "1:02:05" and format_eta(float("nan")) == "?" and format_eta(-1) == "?"
