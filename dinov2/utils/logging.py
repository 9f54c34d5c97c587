"""Console and file logging for the "dinov2" logger, per process.

The main process logs INFO to the console and to `<output_dir>/training_log.txt`; other processes
log warnings to the console and everything to `<output_dir>/logs/rank<r>.txt`, so a distributed run
prints one set of status lines. `setup_logging` returns the handlers it added; pass them to
`remove_handlers` when done (several runs in one Python process do not stack handlers).
"""

import logging
import sys
from pathlib import Path

LOGGER_NAME = "dinov2"
_FORMAT = "%(asctime)s %(levelname)s [rank {rank}] %(message)s"


def setup_logging(
    output_dir: str | Path | None, rank: int = 0, level: int = logging.INFO
) -> list[logging.Handler]:
    """Attach console (and, with `output_dir`, file) handlers to the "dinov2" logger; return them."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    formatter = logging.Formatter(_FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if rank == 0 else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if output_dir is not None:
        path = Path(output_dir) / ("training_log.txt" if rank == 0 else f"logs/rank{rank}.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)
    return handlers


def remove_handlers(handlers: list[logging.Handler]) -> None:
    """Detach and close handlers returned by `setup_logging`."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in handlers:
        logger.removeHandler(handler)
        handler.close()
