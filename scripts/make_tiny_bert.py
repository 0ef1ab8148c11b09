#!/usr/bin/env python3
"""Writes a tiny random BERT in the Hugging Face layout into DIR: config.json, model.safetensors
and tokenizer.json. The tests of common/src/bert.rs use the copy committed in tests/data/tiny-bert
(with its reference outputs from scripts/bert_reference.py), so the test suite needs no Python.

    PYTHONPATH="$(scripts/pydeps)" python3 scripts/make_tiny_bert.py tests/data/tiny-bert
    PYTHONPATH="$(scripts/pydeps)" python3 scripts/bert_reference.py tests/data/tiny-bert \
        tests/data/tiny-bert/reference.safetensors

Deterministic: the same --seed (and the pinned torch / tokenizers of scripts/pydeps) gives the same
bytes. The parameters are drawn wider than BERT's own initialisation (matrices N(0, 0.2²), biases
and LayerNorm offsets N(0, 0.1²), LayerNorm scales 1 + N(0, 0.1²)) so attention is far from
uniform and every parameter visibly matters in the parity and gradient checks. The tensor names
are those of transformers' BertModel state dict (checked by loading the result with
BertModel.from_pretrained: no missing and no unexpected keys).
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("USE_HUB_KERNELS", "0")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors  # noqa: E402
from tokenizers.models import WordPiece  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
PUNCT = ".,!?'-:;()"
# Whole words and a few suffixes; the rest of any lowercase ASCII text falls back to letters.
WORDS = (
    "the a an and of to in is it this that was for on with as but not be are film movie "
    "story good bad great very one all its by so at more like than too just who his her "
    "he she they we you i have has time funny love best ever never make made still long little "
    "about their world plot cast every them charm watch twice true sad script act hours will get "
    "back boring mess culture why seen hi goes warm human twist sell character or say even close "
    "yes loss short second while up"
).split()
SUFFIXES = ["##s", "##ing", "##ed", "##ly", "##er"]


def vocabulary():
    vocab = list(SPECIALS)
    for group in (list(PUNCT), list(DIGITS), list(LETTERS), ["##" + c for c in LETTERS + DIGITS],
                  SUFFIXES, WORDS):
        for token in group:
            if token not in vocab:
                vocab.append(token)
    return vocab


def config(vocab_size):
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
    }


def tokenizer(vocab):
    tok = Tokenizer(WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                              max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def parameters(cfg, seed):
    """Random tensors named and shaped exactly as BertModel's state dict, in name order."""
    from transformers import BertConfig, BertModel

    shapes = {k: tuple(v.shape) for k, v in BertModel(BertConfig(**cfg)).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = shapes[name]
        noise = torch.randn(shape, generator=gen, dtype=torch.float64)
        if name.endswith("LayerNorm.weight"):
            t = 1.0 + 0.1 * noise
        elif name.endswith(".bias"):
            t = 0.1 * noise
        else:
            t = 0.2 * noise
        out[name] = t.to(torch.float32).contiguous()
    return out


def check(directory):
    from transformers import BertModel

    _, info = BertModel.from_pretrained(directory, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        sys.exit(f"error: BertModel.from_pretrained({directory}) reports {bad}")
    enc = Tokenizer.from_file(os.path.join(directory, "tokenizer.json")).encode("The film, 日本!")
    if enc.tokens[0] != "[CLS]" or enc.tokens[-1] != "[SEP]" or "[UNK]" not in enc.tokens:
        sys.exit(f"error: unexpected tokenization {enc.tokens}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--seed", type=int, default=20240611)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    vocab = vocabulary()
    cfg = config(len(vocab))
    with open(os.path.join(args.dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    tokenizer(vocab).save(os.path.join(args.dir, "tokenizer.json"), pretty=True)
    save_file(parameters(cfg, args.seed), os.path.join(args.dir, "model.safetensors"),
              metadata={"format": "pt"})
    check(args.dir)
    print(f"wrote a tiny BERT (vocab {len(vocab)}, seed {args.seed}) to {args.dir}")


if __name__ == "__main__":
    main()
