"""Writes the Parquet fixtures of common/src/text (pyarrow's defaults: snappy, as `datasets` exports).

    python3 -m pip install --target /tmp/pa pyarrow   # any recent pyarrow
    PYTHONPATH=/tmp/pa python3 tests/data/text/make_fixtures.py tests/data/text
"""
import sys

import pyarrow as pa
import pyarrow.parquet as pq

out = sys.argv[1]
# The rows the JSONL and CSV tests write too (common/src/text/source.rs, `ROWS`).
texts = ["A fine film.", "Dull, \"slow\" and long", "Café crème, 東京\nsecond line", "ok"]
labels = ["pos", "neg", "pos", "neg"]
domains = ["a", "b", "a", "c"]
tasks = [7, 7, 8, 9]
pq.write_table(
    pa.table({"text": texts, "label": labels, "movie": domains, "task": pa.array(tasks, pa.int64())}),
    f"{out}/rows.parquet",
)
# Integer labels, as `datasets` writes a ClassLabel column.
pq.write_table(pa.table({"sentence": texts, "y": pa.array([1, 0, 1, 0], pa.int8())}), f"{out}/ints.parquet")
# Every kind of row problem: invalid UTF-8 (a binary column), blank text, a null text, an unknown
# label, a null label; and a float column where a domain name is expected.
pq.write_table(
    pa.table(
        {
            "text": pa.array([b"good", b"bad \xff\xfe bytes", b"   ", None, b"fine"], pa.binary()),
            "label": ["pos", "neg", "pos", "maybe", None],
            "movie": pa.array([0.5, 1.5, 2.5, 3.5, 4.5], pa.float64()),
        }
    ),
    f"{out}/bad.parquet",
)
# Codecs: lz4 is read; zstd is not built in (its error must name the file and the codec).
pq.write_table(pa.table({"text": ["lz4 text"], "label": ["pos"]}), f"{out}/lz4.parquet", compression="lz4")
pq.write_table(pa.table({"text": ["x"], "label": ["pos"]}), f"{out}/zstd.parquet", compression="zstd")
