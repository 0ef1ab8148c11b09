#!/usr/bin/env python3
"""Copies a safetensors file with every F32 tensor stored as BF16 (others unchanged).

    python3 scripts/bf16_safetensors.py IN.safetensors OUT.safetensors

Truncation toward zero (the upper half of each f32), standard library only. Used by
`scripts/gpu-check prepare` to carry all-MiniLM-L6-v2 (90 MB in f32, 45 MB in bf16) to a GPU
machine that cannot fetch it; metaloop loads BF16 weights into f32 tensors.
"""
import json
import struct
import sys


def main(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    out_header, chunks, offset = {}, [], 0
    for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0] if kv[0] != "__metadata__" else -1):
        if name == "__metadata__":
            out_header[name] = meta
            continue
        start, end = meta["data_offsets"]
        raw = bytes(body[start:end])
        if meta["dtype"] == "F32":
            half = bytearray(len(raw) // 2)
            half[0::2] = raw[2::4]
            half[1::2] = raw[3::4]
            raw, dtype = bytes(half), "BF16"
        else:
            dtype = meta["dtype"]
        out_header[name] = {"dtype": dtype, "shape": meta["shape"], "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(out_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
