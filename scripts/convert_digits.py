#!/usr/bin/env python3
"""Converts the UCI optical digits CSV (shared/data/digits.csv.gz) into data/digits/*.safetensors.

Standard library only, so it runs anywhere. The splits are fixed by a seeded shuffle:
  meta  = 10 samples per class (100), a small clean set for outer (meta) objectives;
  test  = 20% of the rest per class, stratified;
  train = everything else.
Each file holds `x` (float32 [n, 64], pixel counts 0..16 scaled to 0..1) and `y` (int64 [n]).
Usage: scripts/convert_digits.py PATH/TO/digits.csv.gz data/digits
"""
import gzip
import json
import random
import struct
import sys
from pathlib import Path

SEED = 20261129
META_PER_CLASS = 10
TEST_FRACTION = 0.2


def write_safetensors(path, xs, ys):
    n = len(ys)
    x_bytes = struct.pack(f"<{n * 64}f", *[v / 16.0 for row in xs for v in row])
    y_bytes = struct.pack(f"<{n}q", *ys)
    header = {
        "__metadata__": {"source": "UCI optical recognition of handwritten digits", "scale": "pixel/16"},
        "x": {"dtype": "F32", "shape": [n, 64], "data_offsets": [0, len(x_bytes)]},
        "y": {"dtype": "I64", "shape": [n], "data_offsets": [len(x_bytes), len(x_bytes) + len(y_bytes)]},
    }
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + x_bytes + y_bytes)


def main():
    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    rows = []
    with gzip.open(src, "rt") as f:
        for line_no, line in enumerate(f, 1):
            vals = [int(v) for v in line.strip().split(",")]
            if len(vals) != 65 or not all(0 <= v <= 16 for v in vals[:64]) or not 0 <= vals[64] <= 9:
                sys.exit(f"{src}:{line_no}: expected 64 pixels in 0..16 and a label in 0..9")
            rows.append((vals[:64], vals[64]))
    by_class = {c: [r for r in rows if r[1] == c] for c in range(10)}
    rng = random.Random(SEED)
    splits = {"train": [], "meta": [], "test": []}
    for c in range(10):
        items = by_class[c]
        rng.shuffle(items)
        n_test = round((len(items) - META_PER_CLASS) * TEST_FRACTION)
        splits["meta"] += items[:META_PER_CLASS]
        splits["test"] += items[META_PER_CLASS:META_PER_CLASS + n_test]
        splits["train"] += items[META_PER_CLASS + n_test:]
    out.mkdir(parents=True, exist_ok=True)
    for name, items in splits.items():
        rng.shuffle(items)
        write_safetensors(out / f"{name}.safetensors", [r[0] for r in items], [r[1] for r in items])
        print(f"{name}: {len(items)} samples")


if __name__ == "__main__":
    main()
