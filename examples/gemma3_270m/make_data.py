"""Writes the Gemma 3 270M example's data (deterministic): the toy's four task families phrased in plain English,
and a preference chunk. Re-run to regenerate: python examples/gemma3_270m/make_data.py

  tasks.jsonl   prompt, response, task   (math, code, following, generation: SFT chunks)
  prefs.jsonl   prompt, chosen, rejected, task   (following_pref: DPO; rejected = the word copied, not capitalised)
"""
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from task_rows import unique, write_rows  # noqa: E402  (examples/task_rows.py)

ROWS_PER_TASK = 140  # 60 train + 40 validation + 40 test: one held-out row is 2.5 points of a chunk, not 8
PREF_ROWS = 140      # likewise; made-up words (the word list is used by `following`)
WORDS = [
    "apple", "river", "garden", "window", "pencil", "basket", "candle", "forest", "island", "ladder", "mirror",
    "pocket", "rabbit", "saddle", "tunnel", "violin", "wallet", "yellow", "zebra", "anchor", "bottle", "button",
    "carpet", "castle", "cherry", "circle", "cloud", "copper", "cotton", "desert", "dragon", "engine", "feather",
    "finger", "flower", "galaxy", "ginger", "guitar", "hammer", "harbor", "helmet", "honey", "jacket", "jungle",
    "kettle", "kitten", "lemon", "letter", "magnet", "marble", "meadow", "melon", "monkey", "needle", "orange",
    "oyster", "paper", "parrot", "pepper", "piano", "pillow", "planet", "pumpkin", "puzzle", "rocket", "salmon",
    "silver", "singer", "spider", "spoon", "square", "summer", "sunset", "table", "teapot", "ticket", "tiger", "tomato",
    "tower", "turtle", "valley", "velvet", "wagon", "walnut", "whale", "winter", "wizard", "wooden", "yogurt", "bridge",
    "camera", "coffee", "dinner", "doctor", "farmer", "forest", "garlic", "hollow", "insect", "kingdom", "laptop",
    "lizard", "market", "mountain", "napkin", "number", "ocean", "office", "orchard", "palace", "pirate", "poem",
    "police", "potato", "prison", "raven", "record", "rubber", "shadow", "shelter", "sister", "soldier", "spring",
    "station", "stone", "sugar", "thunder", "timber", "tunnel", "umbrella", "village", "voyage", "water", "weather",
    "wheel", "willow", "wonder", "writer", "acorn", "apron", "arrow", "badge", "banner", "barrel", "beacon", "blanket",
    "blossom", "bucket", "cabin", "cactus", "canvas", "cereal", "chimney", "cobweb", "compass", "cookie", "cradle",
    "crayon", "crystal", "cushion", "dolphin", "donkey", "eagle", "easel", "falcon", "fossil", "fountain", "gadget",
    "goblet", "harvest", "hazel", "hedgehog", "igloo", "jigsaw", "lantern", "lobster", "locket", "mango", "mitten",
    "muffin", "nectar", "noodle", "nugget", "olive", "otter", "paddle", "pebble", "pelican", "penguin", "pickle",
    "pigeon", "plaster", "pretzel", "quilt", "radish", "ribbon", "saucer", "scarf", "sketch", "sponge", "squirrel",
    "stapler", "statue", "tablet", "thimble", "toffee", "trumpet", "tulip", "tuxedo", "vessel", "waffle", "whistle"
]


def math_task(rng):
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    return f"What is {a} plus {b}? Answer with the number only.", str(a + b)


def code_task(rng):
    if rng.random() < 0.5:
        w1, w2 = rng.sample(WORDS, 2)
        return f'What does this Python code print?\nprint("{w1}" + "{w2}")', w1 + w2
    w = rng.choice(WORDS)
    return f'What does this Python code print?\nprint(len("{w}"))', str(len(w))


def following_task(word):
    return f'Write the word "{word}" in capital letters.', word.upper()


def generation_task(rng):
    w = rng.choice(WORDS)
    return f'Write an instruction whose answer is "{w.upper()}".', following_task(w)[0]


SYLLABLES = ["ba", "ko", "mi", "lu", "re", "sa", "to", "vi", "ne", "da", "fo", "gu", "pe", "ri", "zo", "ha"]


def made_up_words(n, rng, taken):
    """Pronounceable words of three syllables not in `taken` (there are 4096)."""
    words = []
    while len(words) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(3))
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def main():
    rng = random.Random(0)
    words = sorted(set(WORDS))
    rng.shuffle(words)
    following = words[:ROWS_PER_TASK]
    assert len(following) == ROWS_PER_TASK, "add words to WORDS"
    preferred = made_up_words(PREF_ROWS, rng, set(words))
    tasks = {"math": unique(math_task, ROWS_PER_TASK, rng), "code": unique(code_task, ROWS_PER_TASK, rng),
             "following": [following_task(w) for w in following],
             "generation": unique(generation_task, ROWS_PER_TASK, rng)}
    write_rows(HERE / "tasks.jsonl", tasks)
    with open(HERE / "prefs.jsonl", "w", encoding="utf-8") as f:
        for w in preferred:
            prompt, chosen = following_task(w)
            f.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": w, "task": "following_pref"}) + "\n")


if __name__ == "__main__":
    main()
