"""An existing LLaMA-Factory data directory as a source: each named dataset becomes one chunk, its rows
parsed as LLaMA-Factory would (alpaca or sharegpt/openai formatting, `columns`, `tags`, `ranking`,
`kto_tag`) and its training rows written back in their own format, with its own dataset_info entry."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": None, "system": None}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}


def load_entries(dataset_dir: Path, names: list[str], index: int) -> dict[str, dict]:
    info_path = dataset_dir / "dataset_info.json"
    if not info_path.is_file():
        raise UserError(f"data.sources.{index}.dataset_dir: {info_path} not found")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    missing = [n for n in names if n not in info]
    if missing:
        raise UserError(f"data.sources.{index}.datasets: {', '.join(missing)} not in {info_path} "
                        f"(it has {', '.join(info)})")
    unsupported = [n for n in names if "file_name" not in info[n]]
    if unsupported:
        raise UserError(f"data.sources.{index}.datasets: {', '.join(unsupported)} are not local files (no file_name)")
    return {n: info[n] for n in names}


def read_records(path: Path, index: int) -> list[dict]:
    if not path.is_file():
        raise UserError(f"data.sources.{index}: {path} not found")
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except json.JSONDecodeError as e:
        raise UserError(f"data.sources.{index}: {path} line {e.lineno}: not valid JSON ({e.msg})") from None


def parse_record(rec: dict, entry: dict) -> dict:
    """The tool's fields from one record: prompt, history (earlier turns), response / chosen / rejected / label."""
    cols = entry.get("columns", {})
    ranking = entry.get("ranking", False)
    if entry.get("formatting", "alpaca") == "alpaca":
        get = lambda k: rec.get(cols.get(k, ALPACA_COLUMNS.get(k)) or "", None)
        prompt = "\n".join(p for p in (get("prompt"), get("query")) if p)
        history = [{"role": r, "content": c} for u, a in (get("history") or []) for r, c in (("user", u), ("assistant", a))]
        row = {"prompt": prompt or None, "history": history, "system": get("system")}
        if ranking:
            row.update(chosen=get("chosen") or None, rejected=get("rejected") or None)
        elif cols.get("prompt") == "text" and "response" not in cols:
            row.update(text=rec.get("text"), prompt=None)
        else:
            row["response"] = get("response")
    else:
        tags = {**(OPENAI_TAGS if entry["formatting"] == "openai" else SHAREGPT_TAGS), **entry.get("tags", {})}
        roles = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant", tags["system_tag"]: "system"}
        turns = [{"role": roles.get(m[tags["role_tag"]], "other"), "content": m[tags["content_tag"]]}
                 for m in rec.get(cols.get("messages", "conversations"), [])]
        system = [t["content"] for t in turns if t["role"] == "system"] or [rec.get(cols.get("system", ""), None)]
        turns = [t for t in turns if t["role"] in ("user", "assistant")]
        if not ranking and turns and turns[-1]["role"] == "assistant":
            row = {"response": turns[-1]["content"]}
            turns = turns[:-1]
        elif ranking:
            pick = lambda k: (rec.get(cols.get(k, k)) or {}).get(tags["content_tag"])
            row = {"chosen": pick("chosen"), "rejected": pick("rejected")}
        else:
            row = {"response": None}
        row.update(prompt=turns[-1]["content"] if turns else None, history=turns[:-1], system=system[0])
    kto = cols.get("kto_tag")
    if kto:
        row["label"] = rec.get(kto)
    return row


def read_llamafactory(src, index: int) -> list[dict]:
    """Rows of the named datasets; each keeps its raw record and entry so training data stays in its own format."""
    entries = load_entries(src.dataset_dir, src.datasets, index)
    rows = []
    for name, entry in entries.items():
        for n, rec in enumerate(read_records(src.dataset_dir / entry["file_name"], index)):
            rows.append({**parse_record(rec, entry), "chunk_value": name, "raw": rec, "lf_entry": entry,
                         "id": f"{name}:{n}"})
    return rows
