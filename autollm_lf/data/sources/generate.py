"""The `generate` source: an LLM writes examples from documents (rows of another source).

One prompt per document, rendered from a jinja2 template (autollm_lf/templates/generate.j2 unless the config names
another), sent to an OpenAI-compatible chat endpoint through the shared client (llm.ChatClient):
concurrent with a bound, retried on transient errors. Answers are cached on disk by prompt hash, so a
re-run sends no request at all. An answer must be a JSON list of {prompt, response} objects; a malformed
answer (or item) is counted, logged to <cache_dir>/malformed.jsonl and skipped.
"""
from __future__ import annotations

import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jinja2

from ...errors import UserError, mask_secrets
from ...evaluate.llm import ChatClient
from ...fileio import append_jsonl, read_json, write_json
from ...log import get_logger
from ...paths import find_template
from ...rows import Record

logger = get_logger(__name__)

FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)
ALIASES = {"prompt": ("prompt", "question", "instruction"), "response": ("response", "answer", "output")}


def parse_examples(answer: str) -> tuple[list[dict], int, str | None]:
    """(examples, malformed items, why the whole answer is unusable or None)."""
    text = (answer or "").strip()
    fenced = FENCE.search(text)
    if fenced:
        text = fenced.group(1).strip()
    candidates = [text]
    if "[" in text and "]" in text:
        candidates.append(text[text.index("["): text.rindex("]") + 1])
    for c in candidates:
        try:
            parsed = json.loads(c)
            break
        except json.JSONDecodeError:
            continue
    else:
        return [], 0, "no JSON list in the answer"
    if isinstance(parsed, dict):
        parsed = next((v for v in parsed.values() if isinstance(v, list)), None)
    if not isinstance(parsed, list):
        return [], 0, "the JSON is not a list"
    examples, bad = [], 0
    for item in parsed:
        got = {f: next((item[k] for k in keys if isinstance(item, dict) and isinstance(item.get(k), (str, int, float))
                        and str(item[k]).strip()), None) for f, keys in ALIASES.items()}
        if got["prompt"] is None or got["response"] is None:
            bad += 1
            continue
        examples.append({f: str(v).strip() for f, v in got.items()})
    return examples, bad, (None if examples or not parsed else "no item has a prompt and a response")


def _key(src, prompt: str) -> str:
    return hashlib.sha256(json.dumps([src.model, src.temperature, src.max_tokens, prompt]).encode()).hexdigest()


def read_generate(src, where: str, cfg, docs: list[dict]) -> list[Record]:
    """Rows {prompt, response, chunk_value, id} written by the LLM from `docs` (the rows of src.documents);
    prints what it cost and what it skipped."""
    path = find_template(src.prompt_template)
    if path is None:
        raise UserError(f"{where}.prompt_template: no template {src.prompt_template!r} in autollm_lf/templates/")
    try:
        template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(path.read_text(encoding="utf-8"))
    except jinja2.TemplateError as e:
        raise UserError(f"{where}.prompt_template: {path}: {e}") from None
    column = cfg.data.chunk_column
    prompts = []
    for n, doc in enumerate(docs):
        text = doc.get(src.text_column)
        if text in (None, ""):
            raise UserError(f"{where}.text_column: document {n} has no {src.text_column!r} "
                            f"(columns: {', '.join(map(str, doc))}); name the text column")
        try:
            prompts.append(template.render(text=text, n=src.per_document, document=doc))
        except jinja2.TemplateError as e:
            raise UserError(f"{where}.prompt_template: {path}: {e}") from None
    cache = Path(src.cache_dir)
    keys = [_key(src, p) for p in prompts]
    answers = {k: read_json(cache / f"{k}.json", {}).get("answer") for k in set(keys)}
    todo = {k: p for k, p in zip(keys, prompts) if answers[k] is None}
    client, errors, last_error = None, 0, None
    if todo:
        client = ChatClient(src, where)  # a server that does not answer stops here, with one line

        def ask(item):
            k, p = item
            try:
                return k, client.complete(p), None
            except Exception as e:  # after its retries: the prepare stops (below), nothing is half-written
                return k, None, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"

        with ThreadPoolExecutor(max_workers=src.concurrency) as pool:
            for k, answer, err in pool.map(ask, todo.items()):
                if err:  # every answer that did arrive is cached: a re-run asks only for the rest
                    errors, last_error = errors + 1, err
                    continue
                answers[k] = answer
                write_json(cache / f"{k}.json", {"prompt": todo[k], "answer": answer})
        if errors:
            raise UserError(mask_secrets(
                f"{where}.base_url: {errors} of {len(todo)} requests to {src.base_url} failed after {src.retries} "
                f"retries (last: {last_error}); the {len(todo) - errors} answers that arrived are cached in {cache}; "
                f"re-run when the endpoint answers to continue"))
    rows, malformed, bad_items = [], 0, 0
    for n, (doc, k) in enumerate(zip(docs, keys)):
        if answers[k] is None:
            continue
        examples, bad, why = parse_examples(answers[k])
        bad_items += bad
        if why:
            malformed += 1
            if k in todo:  # logged once, when the answer arrives
                append_jsonl(cache / "malformed.jsonl",
                             {"key": k, "document": n, "why": why, "answer": answers[k][:500]})
            continue
        doc_id = doc.get(src.id_column, n)
        chunk = src.chunk or (doc.get(column) if column else None) or "generated"
        for j, ex in enumerate(examples):
            rows.append({**ex, "chunk_value": chunk, "id": f"{doc_id}:{j}",
                         **({"chunk_fixed": src.chunk} if src.chunk else {})})
    stats = {"documents": len(docs), "requests": client.requests if client else 0, "cached": len(set(keys)) - len(todo),
             "examples": len(rows), "malformed_answers": malformed, "malformed_items": bad_items, "failed": errors}
    logger.info(f"generate ({where}): {len(docs)} documents, {stats['requests']} requests, {stats['cached']} "
                f"answers from the cache, {len(rows)} examples; skipped {malformed} malformed answers, "
                f"{bad_items} malformed items, "
                f"{errors} failed requests" + (f" (see {cache / 'malformed.jsonl'})" if malformed or errors else ""))
    write_json(cache / "last_stats.json", stats)
    return rows
