"""Where the rows come from: the `data:` section and every source type (also the fixed evaluation sets)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import mask_url, url_secrets

PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent


SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # inf/NaN weights or bounds are typos


class SourceBase(Strict):
    name: Optional[str] = Field(None, description="provenance label of its rows (default <type>:<index>)")
    train_only: bool = Field(False, description="its rows only train, never held out for validation or test "
                                                "(data you do not want to be scored on, e.g. scraped or noisy)")


class SqlSource(SourceBase):
    """Rows from a SQL query against any SQLAlchemy URL, on a read-only connection (sqlite, postgresql, mysql)."""
    type: Literal["sql"]
    url: str
    query: str
    read_only: Literal["enforce", "trusted"] = Field(
        "enforce", description="enforce: autollm makes the connection read-only (sqlite, postgresql, mysql, mariadb); "
                               "trusted: another dialect, whose account you vouch cannot write")
    columns: dict[str, str] = Field(default_factory=dict, description="tool field -> source column")


class FileSource(SourceBase):
    """Rows from a json/jsonl/csv/parquet file, loaded with `datasets`."""
    type: Literal["file"]
    path: Path
    columns: dict[str, str] = Field(default_factory=dict)


class LlamaFactorySource(SourceBase):
    """Datasets of an existing LLaMA-Factory data directory, each one chunk, used in their own format."""
    type: Literal["llamafactory"]
    dataset_dir: Path
    datasets: list[str] = Field(min_length=1, description="names in its dataset_info.json")


DocumentSource = Annotated[Union[SqlSource, FileSource], Field(discriminator="type")]


def no_credentials(url: str) -> str:
    """Endpoints take their key from api_key_env (read from the environment, never written), not in the URL."""
    if url_secrets(url):
        raise ValueError(f"{mask_url(url)!r} carries a password or key; give the endpoint's URL without it and "
                         f"the key's environment variable as api_key_env")
    return url


class ChatEndpoint(Strict):
    """An OpenAI-compatible chat endpoint (a `generate` source, the judge): where, which model, the key's variable,
    how many requests at once and how often to retry. Each user sets its own prompt, timeout and answer length."""
    base_url: str
    model: str
    api_key_env: Optional[str] = Field(None, description="name of the environment variable holding the API key")
    concurrency: int = Field(4, ge=1, le=64)
    retries: int = Field(2, ge=0, le=10)

    @field_validator("base_url")
    @classmethod
    def _no_credentials_in_url(cls, v):
        return no_credentials(v)


class GenerateSource(SourceBase, ChatEndpoint):
    """An LLM writes examples from documents (rows of another source) through an OpenAI-compatible chat endpoint."""
    type: Literal["generate"]
    documents: DocumentSource
    text_column: str = Field("text", description="the documents' column holding the text")
    id_column: str = Field("id", description="the documents' column naming a document (else its row number)")
    chunk: Optional[str] = Field(None, description="chunk value of the generated rows (default: the document's "
                                                   "data.chunk_by column, else 'generated')")
    per_document: int = Field(3, ge=1, le=100, description="examples asked for per document")
    prompt_template: str = "generate.j2"
    timeout: float = Field(120.0, gt=0)
    max_tokens: int = Field(1024, ge=1)
    temperature: float = Field(0.0, ge=0)
    cache_dir: Optional[Path] = Field(None, description="answers cached by prompt hash "
                                                        "(default runs/<name>/cache/generate)")


class BadCasesSource(SourceBase):
    """The validation rows a previous run's best merge got wrong (its report/bad_cases.jsonl)."""
    type: Literal["bad_cases"]
    run: Path = Field(description="the previous run's folder, e.g. runs/toy")
    rejected: bool = Field(False, description="keep the model's wrong answer as `rejected` "
                                              "(a preference chunk: DPO/ORPO)")
    chunk: str = Field("bad_cases", description="chunk value of these rows")


Source = Annotated[Union[SqlSource, FileSource, LlamaFactorySource, GenerateSource, BadCasesSource],
                   Field(discriminator="type")]


class ChunkCount(Strict):
    count: int = Field(ge=1, description="N chunks, rows assigned at random (deterministic by seed)")


class ChunkSize(Strict):
    size: int = Field(ge=1, description="chunks of N rows, rows assigned at random (deterministic by seed)")


class DataConfig(Strict):
    sources: list[Source] = Field(min_length=1)
    chunk_by: Union[str, ChunkCount, ChunkSize] = Field("task", description="a column, {count: N} or {size: N}")
    validation_per_chunk: int = Field(40, ge=0, description="0 only with a fixed evaluation.validation set")
    test_per_chunk: int = Field(40, ge=0, description="0 only with a fixed evaluation.test set")
    min_train_per_chunk: int = Field(1, ge=1)

    @field_validator("chunk_by", mode="before")
    @classmethod
    def _chunk_by_form(cls, v):
        ok = isinstance(v, str) and v.strip() or (isinstance(v, dict) and len(v) == 1 and set(v) <= {"count", "size"}
                                                  and isinstance(v[next(iter(v))], int) and v[next(iter(v))] >= 1)
        if not ok:
            raise ValueError(f"unknown form {v!r}; give a column name (e.g. task), {{count: N}} or {{size: N}} "
                             f"with N a positive integer")
        return v

    @property
    def chunk_column(self) -> Optional[str]:
        return self.chunk_by if isinstance(self.chunk_by, str) else None
