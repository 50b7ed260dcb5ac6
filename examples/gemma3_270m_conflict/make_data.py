"""Writes the conflict setting's data (deterministic): three task families neither other Gemma example uses, and a
`train_only` chunk that teaches the opposite of one of them, as a careless scrape would: `sort_words` answers
"Sort these words alphabetically" in alphabetical order, `sort_scraped` answers the same prompts (other words) in
reverse order. train@all takes the bad chunk in; the merge has to turn its delta down. Re-run to regenerate:
python examples/gemma3_270m_conflict/make_data.py

  tasks.jsonl     prompt, response, task   (add, first_word, sort_words: SFT chunks)
  scraped.jsonl   prompt, response, task   (sort_scraped: a train_only source)
"""
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from task_rows import unique, write_rows  # noqa: E402  (examples/task_rows.py)

TRAIN, HELD_OUT = 100, 100  # per chunk: 100 training rows, 100 validation + 100 test (one test row: 1 point)
NOUNS = ["apple", "bench", "candle", "desk", "eagle", "flute", "guitar", "hammer", "island", "jacket", "kettle",
         "ladder", "mirror", "needle", "orange", "pencil", "quilt", "rocket", "saddle", "tiger", "umbrella", "violin",
         "wagon", "yacht", "zebra", "basket", "carpet", "dragon", "engine", "forest"]
NAMES = ["Anna", "Boris", "Clara", "David", "Elena", "Felix", "Greta", "Hugo", "Irene", "Jonas"]
VERBS = ["painted", "carried", "found", "opened", "sold", "cleaned", "moved", "built"]


def add_task(rng):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add {a} and {b}. Reply with the sum only.", str(a + b)


def first_word_task(rng):
    sentence = f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(NOUNS)} yesterday"
    return f'Which word comes first in this sentence: "{sentence}"?', sentence.split()[0]


def sort_prompt(rng):
    words = rng.sample(NOUNS, 3)
    return f"Sort these words alphabetically: {', '.join(words)}", words


def sort_words_task(rng):
    prompt, words = sort_prompt(rng)
    return prompt, ", ".join(sorted(words))


def sort_scraped_task(rng):
    prompt, words = sort_prompt(rng)
    return prompt, ", ".join(sorted(words, reverse=True))  # the opposite of sort_words


def main():
    rng, seen = random.Random(7), set()  # one `seen` for all: no prompt in two chunks
    sizes = {"add": TRAIN + 2 * HELD_OUT, "first_word": TRAIN + 2 * HELD_OUT, "sort_words": TRAIN + 2 * HELD_OUT,
             "sort_scraped": TRAIN}
    makers = {"add": add_task, "first_word": first_word_task, "sort_words": sort_words_task,
              "sort_scraped": sort_scraped_task}
    rows = {task: unique(makers[task], n, rng, seen) for task, n in sizes.items()}
    for file, tasks in (("tasks.jsonl", ["add", "first_word", "sort_words"]), ("scraped.jsonl", ["sort_scraped"])):
        write_rows(HERE / file, {t: rows[t] for t in tasks})


if __name__ == "__main__":
    main()
