"""Atomic training checkpoints, retention of the newest K, and resume from the newest valid one.

Layout under <output_dir>:
    checkpoints/model_<iteration:07d>.pth   training state (see `TrainState` keys below)
    eval/<iteration>/teacher_checkpoint.pth teacher export {"teacher": teacher state dict}

A training checkpoint is a dict with keys "model" (SSLMetaArch state dict: "student.*", "teacher.*",
loss centers), "optimizer", "iteration" (iterations completed), "sampler", "rng" (one entry per
rank), "grad_scaler", "world_size" and "config". Writes go to a temporary file in the same folder,
are fsync'ed, then renamed over the final name, so a crash never leaves a partial file under a
`model_*.pth` name; a file that is nonetheless unreadable (e.g. a truncated copy) is skipped with a
warning when resuming. A write that fails (disk full, no permission) raises `CheckpointWriteError`
naming the file, after removing its temporary file; older checkpoints are untouched.
"""

import contextlib
import logging
import random
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2.utils import files

logger = logging.getLogger("dinov2")

CHECKPOINT_PATTERN = re.compile(r"^model_(\d{7,})\.pth$")
REQUIRED_KEYS = ("model", "optimizer", "iteration")


class CheckpointWriteError(OSError):
    """A checkpoint or export could not be written (errno, strerror and filename of the cause)."""

    @classmethod
    def of(cls, cause: OSError, path: Path) -> "CheckpointWriteError":
        """The error for `cause` (ENOSPC, EACCES, ...) while writing `path`."""
        return cls(cause.errno, cause.strerror or str(cause), str(path))

    def __str__(self) -> str:
        # OSError's own text, also for a cause raised with a bare message (no errno): it names the file.
        reason = self.strerror if self.errno is None else f"[Errno {self.errno}] {self.strerror}"
        return f"{reason}: '{self.filename}'"


def checkpoint_name(iteration: int) -> str:
    """File name of the checkpoint taken after `iteration` completed iterations."""
    return f"model_{iteration:07d}.pth"


def checkpoint_iteration(path: str | Path) -> int:
    """The iteration in a checkpoint file name (`model_0000050.pth` -> 50)."""
    m = CHECKPOINT_PATTERN.match(Path(path).name)
    if m is None:
        raise ValueError(f"not a training checkpoint name (model_<iteration>.pth): {path}")
    return int(m.group(1))


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save `obj` to `path` atomically (dinov2.utils.files: temp file, fsync, os.replace).

    The final name only ever holds a complete file; the temp file is removed on failure. An OSError
    (ENOSPC, EACCES, ...) is raised again as CheckpointWriteError whose filename is `path`.
    """
    try:
        return files.atomic_torch_save(obj, path)
    except OSError as e:
        raise CheckpointWriteError.of(e, Path(path)) from e


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every `model_*.pth` in `checkpoint_dir`, oldest first."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for p in checkpoint_dir.iterdir():
        m = CHECKPOINT_PATTERN.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def list_teacher_exports(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(iteration, path) of every `eval/<iteration>/teacher_checkpoint.pth` of a run, oldest first."""
    found = []
    for path in Path(output_dir).glob("eval/*/teacher_checkpoint.pth"):
        if path.parent.name.isdigit() and path.is_file():
            found.append((int(path.parent.name), path))
    return sorted(found)


def load_checkpoint_file(path: str | Path) -> dict:
    """Load a training checkpoint on CPU; raise ValueError naming the file when it is unusable."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"checkpoint {path} is not a training checkpoint (needs {REQUIRED_KEYS}, has {keys})"
        )
    return state


def load_latest_valid(checkpoint_dir: str | Path) -> tuple[dict, Path] | None:
    """The newest checkpoint in `checkpoint_dir` that loads, skipping unreadable ones with a warning."""
    for iteration, path in reversed(list_checkpoints(checkpoint_dir)):
        try:
            state = load_checkpoint_file(path)
        except ValueError as e:
            logger.warning("skipping checkpoint of iteration %d: %s", iteration, e)
            continue
        return state, path
    return None


def save_checkpoint(
    state: dict, checkpoint_dir: str | Path, keep: int, protect: Collection[int] = ()
) -> Path:
    """Write `state` (with state["iteration"]) atomically and delete all but the newest `keep`.

    Checkpoints whose iteration is in `protect` are never deleted (e.g. the last one before the
    collapse monitor started warning); they do not count towards `keep`.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = atomic_torch_save(state, Path(checkpoint_dir) / checkpoint_name(int(state["iteration"])))
    rotating = [(it, p) for it, p in list_checkpoints(checkpoint_dir) if it not in protect]
    for _, old in rotating[:-keep]:
        with contextlib.suppress(OSError):
            old.unlink()
    return path


def capture_rng_state() -> dict:
    """This process's python, numpy, torch CPU (and current CUDA device) RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    # numpy's state as a tensor and plain numbers, so checkpoints load with weights_only=True.
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of `capture_rng_state`."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def export_teacher(
    teacher_state_dict: dict[str, torch.Tensor],
    output_dir: str | Path,
    iteration: int,
    student_cfg: Any = None,
) -> Path:
    """Write <output_dir>/eval/<iteration>/teacher_checkpoint.pth as {"teacher": state dict} (Meta's format).

    `teacher_state_dict` is the teacher ModuleDict's state dict ("backbone.*", "dino_head.*", ...),
    exactly what Meta's DINOv2 writes, so its eval tools and ours load it with checkpoint_key="teacher".
    With `student_cfg` (cfg.student), a "config": {"student": {...}} entry records the settings that
    cannot be read off the weights (interpolation, heads); loaders that only read "teacher" ignore it.
    """
    path = Path(output_dir) / "eval" / str(iteration) / "teacher_checkpoint.pth"
    cpu_state = {k: v.detach().to("cpu", copy=True) for k, v in teacher_state_dict.items()}
    content: dict[str, Any] = {"teacher": cpu_state}
    if student_cfg is not None:
        content["config"] = {"student": {k: student_cfg[k] for k in student_cfg}}
    return atomic_torch_save(content, path)
