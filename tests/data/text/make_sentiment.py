#!/usr/bin/env python3
"""Writes the synthetic text sets the text-job tests train on (tests/data/text/sentiment/).

Made-up movie-review-like sentences built only from words in tests/data/tiny-bert's vocabulary,
so the tiny BERT tokenizes them into whole words. A review is `pos` or `neg` by its sentiment
words (good, great, best, love, ... / bad, boring, mess, ...) among neutral filler; a plot
summary is neutral filler with story words and the label `plot`. Deterministic (Python's
random with fixed seeds): running it again writes the same bytes. No real corpus is copied.

    python3 tests/data/text/make_sentiment.py tests/data/text/sentiment
"""
import json
import random
import sys
from pathlib import Path

POSITIVE = ["good", "great", "best", "love", "funny", "charm", "warm", "true"]
NEGATIVE = ["bad", "boring", "mess", "sad", "loss", "never", "too long", "short"]
FILLER = ["the", "film", "movie", "story", "cast", "script", "is", "was", "and", "of", "it",
          "this", "that", "very", "so", "all", "its", "one", "with", "as", "at", "in", "we", "you",
          "they", "have", "has", "still", "little", "about", "time", "every", "even", "up"]
PLOT = ["he", "she", "they", "world", "back", "hours", "character", "goes", "close", "second",
        "while", "human", "culture", "twist", "get", "made", "make", "act", "watch", "seen"]


def review(rng, label):
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
    strong = POSITIVE if label == "pos" else NEGATIVE
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(strong))
    return " ".join(words) + rng.choice([".", "!", "."])


def plot(rng):
    words = [rng.choice(PLOT + FILLER) for _ in range(rng.randint(10, 24))]
    return " ".join(words) + "."


def write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def reviews(seed, n):
    rng = random.Random(seed)
    return [{"text": review(rng, label), "label": label}
            for label in (rng.choice(["pos", "neg"]) for _ in range(n))]


def main(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write(out / "train.jsonl", reviews(1, 240))
    write(out / "meta.jsonl", reviews(2, 40))
    write(out / "test.jsonl", reviews(3, 80))
    rng = random.Random(4)
    write(out / "plots.jsonl", [{"text": plot(rng), "label": "plot"} for _ in range(60)])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "sentiment")
