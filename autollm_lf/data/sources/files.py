"""The `file` source: a JSON, JSON Lines, CSV or Parquet file, read by the datasets library."""
from __future__ import annotations

from ...config import FileSource
from ...errors import UserError
from ...rows import Record

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def read_file(src: FileSource, where: str) -> list[Record]:
    import datasets

    builder = FILE_BUILDERS.get(src.path.suffix.lower())
    if builder is None:
        raise UserError(f"{where}.path: {src.path} is not one of {sorted(FILE_BUILDERS)}")
    if not src.path.is_file():
        raise UserError(f"{where}.path: {src.path} not found")
    # datasets' own error log and progress bars would add lines to a one-line error
    verbosity, bars = datasets.utils.logging.get_verbosity(), datasets.is_progress_bar_enabled()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL + 1)
    datasets.disable_progress_bars()
    try:
        return list(datasets.load_dataset(builder, data_files=str(src.path), split="train"))
    except Exception as e:  # datasets wraps parser errors; the cause says which row and column
        cause = e.__cause__ or e
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise UserError(f"{where}.path: cannot load {src.path} ({first}); "
                        f"fix the file (UTF-8, one format) or convert it") from None
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
