"""Writes the second real-model setting's data (deterministic): four task families the Gemma example does not use,
so claims about the merge are checked on data it was not tuned for. Re-run to regenerate:
python examples/gemma3_270m_other/make_data.py

  tasks.jsonl   prompt, response, task   (times, lowercase, last_word, reverse_list: SFT chunks)
"""
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from task_rows import draw, write_rows  # noqa: E402  (examples/task_rows.py)

ROWS_PER_TASK = 220  # 60 train + 80 validation + 80 test: one test row is 1.25 points of a chunk
NOUNS = ["stone", "river", "cloud", "table", "horse", "lamp", "shoe", "bread", "chair", "grass", "snow", "wheel",
         "glass", "coat", "bell", "drum", "fork", "kite", "nest", "road", "sand", "tent", "wolf", "yard", "boat",
         "cake", "door", "fish", "gate", "hill", "king", "leaf", "milk", "nose", "park", "ring", "salt", "tree", "wind",
         "bird"]
ADJECTIVES = ["red", "old", "small", "quiet", "bright", "cold", "heavy", "soft", "round", "tall", "warm", "dark"]
VERBS = ["sees", "finds", "likes", "moves", "holds", "paints", "keeps", "wants", "needs", "sells"]


def times_task(rng):
    a, b = rng.randint(2, 25), rng.randint(2, 12)
    return f"Multiply {a} by {b}. Reply with the result only.", str(a * b)


def lowercase_task(rng):
    words = rng.sample(NOUNS, 2)
    text = " ".join(words).upper()
    return f'Rewrite "{text}" in lowercase letters.', text.lower()


def last_word_task(rng):
    sentence = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(NOUNS)}"
    return f'Which word comes last in this sentence: "{sentence}"?', sentence.split()[-1]


def reverse_list_task(rng):
    items = rng.sample(NOUNS, rng.randint(3, 4))
    return f"Reverse the order of this list: {', '.join(items)}", ", ".join(reversed(items))


def main():
    rng = random.Random(1)
    tasks = {"times": times_task, "lowercase": lowercase_task, "last_word": last_word_task,
             "reverse_list": reverse_list_task}
    write_rows(HERE / "tasks.jsonl", draw(tasks, ROWS_PER_TASK, rng))


if __name__ == "__main__":
    main()
