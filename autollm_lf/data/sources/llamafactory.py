"""An existing LLaMA-Factory data directory as a source: each named dataset becomes one chunk, its rows
parsed as LLaMA-Factory would (alpaca or sharegpt/openai formatting, `columns`, `tags`, `ranking`,
`kto_tag`) and its training rows written back in their own format, with its own dataset_info entry."""
from __future__ import annotations

import json
from pathlib import Path

from ...config.owned import REMOTE_ENTRY_KEYS
from ...errors import UserError
from ...rows import Record

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


FORMATTINGS = ("alpaca", "sharegpt", "openai")
TOOL_TAGS = ("function_tag", "observation_tag")  # LLaMA-Factory's tool-call turns
TOOL_DEFAULTS = {"function_tag": "function_call", "observation_tag": "observation"}


def load_entries(dataset_dir: Path, names: list[str], where: str) -> dict[str, dict]:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        raise UserError(f"{where}.dataset_dir: {info_path} not found")
    info = _load_json(info_path, where)
    if not isinstance(info, dict) or not all(isinstance(e, dict) for e in info.values()):
        raise UserError(f"{where}: {info_path} must be a JSON object of dataset name -> entry "
                        f"(as LLaMA-Factory's data/dataset_info.json)")
    missing = [n for n in names if n not in info]
    if missing:
        raise UserError(f"{where}.datasets: {', '.join(missing)} not in {info_path} "
                        f"(it has {', '.join(info)})")
    remote = [(n, k) for n in names for k in REMOTE_ENTRY_KEYS if k in info[n]]
    if remote:  # LLaMA-Factory would read these instead of file_name: data from outside the run's split
        name, key = remote[0]
        raise UserError(f"{where}.datasets: {name} has {key} in {info_path}; LLaMA-Factory prefers it to file_name, "
                        f"so a delta would train on data outside the run: remove {key} from the entry (autollm reads "
                        f"only local files, file_name) or leave the dataset out")
    unsupported = [n for n in names if not isinstance(info[n].get("file_name"), str)]
    if unsupported:
        raise UserError(f"{where}.datasets: {', '.join(unsupported)} are not local files (no file_name)")
    unknown = [n for n in names if info[n].get("formatting", "alpaca") not in FORMATTINGS]
    if unknown:
        raise UserError(f"{where}.datasets: {unknown[0]} has formatting "
                        f"{info[unknown[0]]['formatting']!r}; LLaMA-Factory knows {', '.join(FORMATTINGS)}")
    return {n: info[n] for n in names}


def dataset_file(dataset_dir: Path, file_name: str, where: str) -> Path:
    """The dataset's file, which must lie inside dataset_dir (after resolving '..' and symlinks)."""
    root = dataset_dir.resolve()
    path = (root / file_name).resolve()
    if not path.is_relative_to(root):
        raise UserError(f"{where}: file_name {file_name!r} points outside {root}; "
                        f"datasets must be files inside dataset_dir")
    return path


def _load_json(path: Path, where: str, records: bool = False):
    """The file's JSON; with `records`, a JSON list or JSON lines (as LLaMA-Factory accepts both)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        if records and not text.lstrip().startswith("["):
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: {path} line {e.lineno}: not valid JSON ({e.msg})") from None


def read_records(path: Path, where: str) -> list[Record]:
    if not path.is_file():
        raise UserError(f"{where}: {path} not found")
    records = _load_json(path, where, records=True)
    if isinstance(records, dict):
        records = [records]
    bad = next((n for n, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise UserError(f"{where}: {path} record {bad} is a {type(records[bad]).__name__}, not an object; "
                        f"each record must be a JSON object")
    return records


def parse_record(rec: dict, entry: dict) -> dict:
    """The tool's fields from one record: prompt, history (earlier turns), response / chosen / rejected / label."""
    cols = entry.get("columns", {})
    ranking = entry.get("ranking", False)
    if entry.get("formatting", "alpaca") == "alpaca":
        get = lambda k: rec.get(cols.get(k, ALPACA_COLUMNS.get(k)) or "", None)
        prompt = "\n".join(p for p in (get("prompt"), get("query")) if p)
        history = [{"role": r, "content": c}
                   for u, a in (get("history") or []) for r, c in (("user", u), ("assistant", a))]
        row = {"prompt": prompt or None, "history": history, "system": get("system")}
        if ranking:
            row.update(chosen=get("chosen") or None, rejected=get("rejected") or None)
        elif cols.get("prompt") == "text" and "response" not in cols:
            row.update(text=rec.get("text"), prompt=None)
        else:
            row["response"] = get("response")
    else:
        tags = {**(OPENAI_TAGS if entry["formatting"] == "openai" else SHAREGPT_TAGS), **TOOL_DEFAULTS,
                **entry.get("tags", {})}
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system",
                 **{tags[t]: "tool" for t in TOOL_TAGS}}
        turns = [{"role": roles.get(m[tags["role_tag"]], "other"), "content": m[tags["content_tag"]]}
                 for m in rec.get(cols.get("messages", "conversations"), [])]
        if any(t["role"] == "tool" for t in turns):
            raise ValueError("it has tool turns (function_call/observation), which autollm cannot score yet; "
                             "train on such data with LLaMA-Factory directly, or leave the dataset out")
        system = [t["content"] for t in turns if t["role"] == "system"] or [rec.get(cols.get("system", ""), None)]
        turns = [t for t in turns if t["role"] in ("user", "assistant")]
        if not ranking and turns and turns[-1]["role"] == "assistant":
            row = {"response": turns[-1]["content"]}
            turns = turns[:-1]
        elif ranking:
            pick = lambda k: _message(rec.get(cols.get(k, k)), k, tags["content_tag"])
            row = {"chosen": pick("chosen"), "rejected": pick("rejected")}
        else:
            row = {"response": None}
        row.update(prompt=turns[-1]["content"] if turns else None, history=turns[:-1], system=system[0])
    kto = cols.get("kto_tag")
    if kto:
        row["label"] = rec.get(kto)
    return row


def _message(value, key: str, content_tag: str):
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} is a {type(value).__name__}; in sharegpt/openai formatting it must be one message "
                         f"object with {content_tag!r}")
    return value.get(content_tag)


def read_llamafactory(src, where: str) -> list[Record]:
    """Rows of the named datasets; each keeps its raw record and entry so training data stays in its own format."""
    entries = load_entries(src.dataset_dir, src.datasets, where)
    rows = []
    for name, entry in entries.items():
        path = dataset_file(src.dataset_dir, entry["file_name"], where)
        for n, rec in enumerate(read_records(path, where)):
            try:
                row = parse_record(rec, entry)
            except (ValueError, TypeError, KeyError, AttributeError) as e:
                why = str(e) if isinstance(e, ValueError) else f"unexpected structure ({type(e).__name__}: {e})"
                raise UserError(f"{where}: {path} record {n} of dataset {name!r}: {why}; "
                                f"check it against the dataset's formatting and columns in dataset_info.json") from None
            rows.append({**row, "chunk_value": name, "raw": rec, "lf_entry": entry, "id": f"{name}:{n}"})
    return rows
