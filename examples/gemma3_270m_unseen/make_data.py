"""Writes the fourth real-model setting's data (deterministic): four task families none of the other Gemma examples
uses, written after the search's settings were fixed, so claims about the merge are checked on data nobody tuned
them for. Re-run to regenerate: python examples/gemma3_270m_unseen/make_data.py

  tasks.jsonl   prompt, response, task   (plural, count_words, subtract, hyphenate: SFT chunks)
"""
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from task_rows import draw, write_rows  # noqa: E402  (examples/task_rows.py)

ROWS_PER_TASK = 240  # 60 train + 80 validation + 100 test: one test row is 1 point of a chunk
PLURALS = {"box": "boxes", "glass": "glasses", "bus": "buses", "dish": "dishes", "church": "churches",
           "fox": "foxes", "city": "cities", "baby": "babies", "party": "parties", "story": "stories",
           "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth", "man": "men", "woman": "women",
           "goose": "geese", "leaf": "leaves", "knife": "knives", "wolf": "wolves", "cat": "cats", "dog": "dogs",
           "tree": "trees", "river": "rivers", "lamp": "lamps", "horse": "horses", "chair": "chairs",
           "door": "doors", "bird": "birds", "ring": "rings"}
ADJECTIVES = ["red", "old", "small", "quiet", "bright", "cold", "heavy", "soft", "round", "tall", "warm", "dark"]
WORDS = ["stone", "river", "cloud", "table", "horse", "lamp", "shoe", "bread", "chair", "grass", "snow", "wheel",
         "green", "fast", "open", "little", "under", "near", "blue", "sings", "runs", "sleeps", "jumps", "reads"]


def plural_task(rng):
    adjective, noun = rng.choice(ADJECTIVES), rng.choice(list(PLURALS))
    return f'Write the plural of "{adjective} {noun}".', f"{adjective} {PLURALS[noun]}"


def count_words_task(rng):
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 8))]
    return f'How many words are in "{" ".join(words)}"? Reply with a number.', str(len(words))


def subtract_task(rng):
    a, b = rng.randint(20, 99), rng.randint(2, 19)
    return f"Subtract {b} from {a}. Reply with the result only.", str(a - b)


def hyphenate_task(rng):
    words = rng.sample(WORDS, rng.randint(2, 4))
    return f"Join these words with hyphens: {', '.join(words)}", "-".join(words)


def main():
    rng = random.Random(2)
    tasks = {"plural": plural_task, "count_words": count_words_task, "subtract": subtract_task,
             "hyphenate": hyphenate_task}
    write_rows(HERE / "tasks.jsonl", draw(tasks, ROWS_PER_TASK, rng))


if __name__ == "__main__":
    main()
