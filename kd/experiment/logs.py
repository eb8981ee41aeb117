"""The experiment's log: INFO lines on the console (beside the progress bars), everything in
final_experiment.log once the experiment folder exists."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

from kd.engine import distributed

log = logging.getLogger("kd")


class _TqdmHandler(logging.Handler):
    """Console log lines that do not tear through the progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stderr)


def setup_logging(log_file: Path | None = None) -> None:
    """Console (INFO) and, once the experiment folder exists, `final_experiment.log` (DEBUG)."""
    log.setLevel(logging.DEBUG)
    log.propagate = False
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    if not any(isinstance(h, _TqdmHandler) for h in log.handlers):
        console = _TqdmHandler(logging.INFO if distributed.is_main() else logging.WARNING)
        console.setFormatter(formatter)
        log.addHandler(console)
    if log_file is not None and distributed.is_main():
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            log.removeHandler(handler)
            handler.close()
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(formatter)
        log.addHandler(file_handler)
