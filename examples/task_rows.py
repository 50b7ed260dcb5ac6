"""What the Gemma examples' data scripts share: distinct prompts drawn from a task family, and rows written as the
JSONL files their configs read (prompt, response, task)."""
import json


def unique(make, n, rng, seen=None):
    """`n` rows of `make(rng)` with distinct prompts (also distinct from those in `seen`, which it extends)."""
    rows, seen = [], set() if seen is None else seen
    while len(rows) < n:
        prompt, response = make(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append((prompt, response))
    return rows


def draw(makers, n, rng):
    """{task: n rows of distinct prompts from its maker}, task by task from one `rng` (the order is the draw's)."""
    return {task: unique(make, n, rng) for task, make in makers.items()}


def write_rows(path, rows_by_task):
    """{task: [(prompt, response), ...]} as one JSON object a line, task by task."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"prompt": p, "response": r, "task": task}) + "\n"
                     for task, rows in rows_by_task.items() for p, r in rows)
