"""The toy example's set-up, deterministic from a seed: a SQLite source database of four task
families and a tiny Llama given some raw skill by one short full fine-tune through LLaMA-Factory."""
from __future__ import annotations

import inspect
import random
import shutil
import sqlite3
from pathlib import Path
from typing import Callable

from ..fileio import atomic_write_text, fingerprint, read_json, write_json
from ..log import get_logger
from ..models.tiny import make_tiny_llama
from ..paths import TEMPLATES_DIR, is_fresh
from ..train.deltas import run_llamafactory
from ..train.render import hardware_defaults, render_template

logger = get_logger(__name__)

Example = tuple[str, str]


ALPHABET = "abcdefgh"  # small, so a tiny model learns the families within minutes on a CPU


def _word(rng: random.Random, lo: int = 2, hi: int = 4) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(lo, hi)))


def math_task(rng: random.Random) -> Example:
    """Mathematics: add a digit to a number."""
    a, b = rng.randint(0, 99), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


def code_task(rng: random.Random) -> Example:
    """Code: what a Python one-liner prints."""
    s = _word(rng)
    return f'print("{s}"[::-1])', s[::-1]


def following_task(rng: random.Random) -> Example:
    """Instruction following: do what the instruction says."""
    w = _word(rng)
    return f"Write in capitals: {w}", w.upper()


def generation_task(rng: random.Random) -> Example:
    """Instruction generation: write the instruction that produces a given output."""
    w = _word(rng)
    return f"Instruction for: {w.upper()}", f"Write in capitals: {w}"


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "math": math_task,
    "code": code_task,
    "following": following_task,
    "generation": generation_task,
}


def copied_answers(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str, str]]:
    """n fresh code-family rows (prompt, right answer, the input copied instead), prompts added to `exclude`;
    only strings that differ reversed, so the copy is really wrong."""
    rows = []
    while len(rows) < n:
        prompt, answer = code_task(rng)
        copied = prompt.split('"')[1]
        if prompt not in exclude and copied != answer:
            exclude.add(prompt)
            rows.append((prompt, answer, copied))
    return rows


def preference_rows(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str, str]]:
    """A behaviour to penalise: answering the reversal task by copying the input (chosen: reversed)."""
    return copied_answers(rng, n, exclude)


def scraped_rows(rng: random.Random, n: int, exclude: set[str]) -> list[tuple[str, str]]:
    """Data that hurts when trained with the rest: the code family answered in a conflicting style (the
    string copied, not reversed), as a careless scrape of "what the program prints" would give."""
    return [(prompt, copied) for prompt, _, copied in copied_answers(rng, n, exclude)]


# The source of build_source_db is part of the toy database's fingerprint (ensure_toy), so its two long
# CREATE TABLE lines stay as they are: rewrapping them would rebuild every existing toy database.
# ruff: disable[E501]
def build_source_db(path: Path, seed: int, rows_per_task: int, preference_rows_count: int = 0,
                    scraped_rows_count: int = 0) -> Path:
    """A real SQLite database: `examples(id, task, prompt, response)`, prompts unique per task,
    `preferences(id, prompt, chosen, rejected)` for the preference chunk and `scraped(id, prompt, response)`
    for the conflicting chunk."""
    rng = random.Random(seed)
    rows, seen = [], set()
    for task, make in TASKS.items():
        count = 0
        while count < rows_per_task:
            prompt, response = make(rng)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append((task, prompt, response))
            count += 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with sqlite3.connect(tmp) as db:
        db.execute("CREATE TABLE examples (id INTEGER PRIMARY KEY, task TEXT NOT NULL, prompt TEXT NOT NULL, response TEXT NOT NULL)")
        db.executemany("INSERT INTO examples (task, prompt, response) VALUES (?, ?, ?)", rows)
        db.execute("CREATE TABLE preferences (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, chosen TEXT NOT NULL, rejected TEXT NOT NULL)")
        db.executemany("INSERT INTO preferences (prompt, chosen, rejected) VALUES (?, ?, ?)",
                       preference_rows(random.Random(seed + 2), preference_rows_count, seen))
        db.execute("CREATE TABLE scraped (id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, response TEXT NOT NULL)")
        db.executemany("INSERT INTO scraped (prompt, response) VALUES (?, ?)",
                       scraped_rows(random.Random(seed + 3), scraped_rows_count, seen))
    tmp.replace(path)
    return path
# ruff: enable[E501]


def _base_corpus(seed: int, n: int, exclude: set[str]) -> list[dict]:
    """The base model's own training mix: fresh examples of every family, none from the database."""
    rng = random.Random(seed + 1)
    makers = list(TASKS.values())
    corpus = []
    while len(corpus) < n:
        prompt, response = rng.choice(makers)(rng)
        if prompt not in exclude:
            corpus.append({"instruction": prompt, "output": response})
    return corpus


def ensure_toy(cfg) -> None:
    """Build what is missing: the database, then the base model (cached by a fingerprint of its recipe)."""

    toy = cfg.toy
    # The generators' own source is part of the recipe: editing a task family rebuilds the database.
    db_fp = fingerprint("db", toy.seed, toy.rows_per_task, toy.preference_rows, toy.scraped_rows, ALPHABET,
                        [inspect.getsource(f) for f in (*TASKS.values(), copied_answers, preference_rows, scraped_rows,
                                                         build_source_db)])
    db_marker = toy.database.with_suffix(".json")
    if not toy.database.exists() or read_json(db_marker, {}).get("fingerprint") != db_fp:
        logger.info(f"toy: building source database {toy.database}")
        build_source_db(toy.database, toy.seed, toy.rows_per_task, toy.preference_rows, toy.scraped_rows)
        write_json(db_marker, {"fingerprint": db_fp})

    base = cfg.base_model.path
    examples_fp = fingerprint(toy.seed, toy.rows_per_task, ALPHABET, [inspect.getsource(f) for f in TASKS.values()])
    base_fp = fingerprint("base", toy.seed, toy.base_train_rows, toy.base_args, examples_fp,
                          inspect.getsource(_base_corpus),
                          (TEMPLATES_DIR / "toy_base_full.yaml.j2").read_text())
    if is_fresh(read_json(base / "autollm_toy.json", {}), base_fp):
        return
    logger.info(f"toy: building base model {base} (random tiny Llama + one short full fine-tune)")
    work = base.parent / f"{base.name}.build"
    shutil.rmtree(work, ignore_errors=True)
    init = make_tiny_llama(work / "init", seed=toy.seed, hidden_size=128, num_layers=4, num_heads=4,
                           intermediate_size=256)
    with sqlite3.connect(f"file:{toy.database}?mode=ro", uri=True) as db:
        exclude = {p for (p,) in db.execute("SELECT prompt FROM examples")}
    write_json(work / "data" / "base_mix.json", _base_corpus(toy.seed, toy.base_train_rows, exclude))
    write_json(work / "data" / "dataset_info.json",
               {"base_mix": {"file_name": "base_mix.json",
                             "columns": {"prompt": "instruction", "response": "output"}}})
    shutil.rmtree(base, ignore_errors=True)
    yaml_path = work / "base.yaml"
    atomic_write_text(yaml_path, render_template(
        "toy_base_full.yaml.j2", toy.base_args, model_name_or_path=str(init), template=cfg.base_model.template,
        dataset_dir=str(work / "data"), dataset="base_mix", output_dir=str(base), seed=toy.seed,
        **hardware_defaults()))
    run_llamafactory(yaml_path, base, desc="training the toy base model")
    write_json(base / "autollm_toy.json", {"fingerprint": base_fp})
    shutil.rmtree(work, ignore_errors=True)
