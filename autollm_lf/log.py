"""Logging as LLaMA-Factory's users expect: every module logs to `autollm_lf.<module>`; the console shows the
messages as plain lines (info on stdout, warnings and errors on stderr), `autollm -q` only warnings and errors,
`autollm -v` debug lines too; each run's whole log, with times, goes to runs/<name>/autollm.log as well."""
from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

ROOT = logging.getLogger("autollm_lf")
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}  # -q, default, -v
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Console(logging.Handler):
    """Plain messages on the streams as they are when each is written (pytest's capture, a redirected stdout):
    below WARNING on stdout, the rest on stderr. A record with console=False goes to the log file only (the CLI's
    error line, which it prints itself)."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "console", True):
            stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
            tqdm.write(self.format(record), file=stream)  # above any progress bar, which is then drawn again
            stream.flush()


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar with its ETA on stderr: drawn on a terminal only, never under -q (lines for logs and pipes)."""
    disable = kwargs.pop("disable", None)
    if CONSOLE.level > logging.INFO:
        disable = True
    return tqdm(iterable, file=sys.stderr, disable=disable, dynamic_ncols=True, **kwargs)


def get_logger(module: str) -> logging.Logger:
    """`get_logger(__name__)`: a child of autollm_lf's logger, so -q/-v and the run's log file see it."""
    return logging.getLogger(module)


def set_verbosity(verbosity: int) -> None:
    """-1 (-q), 0 or 1 (-v): what the console shows (the run's log file keeps every line)."""
    CONSOLE.setLevel(LEVELS[max(-1, min(1, verbosity))])


class RunLogFile(logging.FileHandler):
    """The run's log, never the reason its folder exists: messages are held until a stage has made the run folder,
    then written with the rest; a command that stops before that (a check before any work) leaves no folder."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)
        self.held: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None and not Path(self.baseFilename).parent.is_dir():
            self.held.append(record)
            return
        for held in self.held:
            super().emit(held)
        self.held.clear()
        super().emit(record)


@contextlib.contextmanager
def run_log(path: Path) -> Iterator[None]:
    """Within: every message of the package (debug included) also appended to `path`, with its time and module."""
    handler = RunLogFile(path)
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    ROOT.addHandler(handler)
    try:
        yield
    finally:
        ROOT.removeHandler(handler)
        handler.close()


CONSOLE = Console()
CONSOLE.setLevel(logging.INFO)
if not any(isinstance(h, Console) for h in ROOT.handlers):
    ROOT.addHandler(CONSOLE)
ROOT.setLevel(logging.DEBUG)  # each handler filters: the console by -q/-v, the run's log file keeps everything
ROOT.propagate = False  # our lines are printed once, by CONSOLE, whatever the application's root logger does
