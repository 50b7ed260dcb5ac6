"""Every source type in one registry: type -> reader(src, where, cfg) -> raw rows (dicts), one module per type:
files (files.py), databases (sql.py), LLaMA-Factory data dirs (llamafactory.py), LLM-written rows (generate.py) and
last round's bad cases (bad_cases.py)."""
from __future__ import annotations

from typing import Callable

from ...config import RunConfig
from ...rows import Row
from .bad_cases import read_bad_cases
from .files import read_file
from .generate import read_generate
from .llamafactory import read_llamafactory
from .sql import read_sql


def read_rows(src, where: str, cfg: RunConfig) -> list[Row]:
    return READERS[src.type](src, where, cfg)


READERS: dict[str, Callable] = {
    "sql": lambda src, i, cfg: read_sql(src, i),
    "file": lambda src, i, cfg: read_file(src, i),
    "llamafactory": lambda src, i, cfg: read_llamafactory(src, i),
    "generate": lambda src, i, cfg: read_generate(src, i, cfg, read_rows(src.documents, i, cfg)),
    "bad_cases": lambda src, i, cfg: read_bad_cases(src, i),
}
