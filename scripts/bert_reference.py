#!/usr/bin/env python3
"""Reference outputs of a Hugging Face BERT directory for the parity tests of common/src/bert.rs.

    PYTHONPATH="$(scripts/pydeps)" python3 scripts/bert_reference.py DIR OUT.safetensors

Loads DIR with transformers' BertModel (eager attention, offline, no hub kernels) in float64 and
eval mode (dropout off), tokenizes SENTENCES with DIR/tokenizer.json (the last four as sentence
pairs, so token type 1 occurs; padded to the longest in the batch, truncated to
min(128, max_position_embeddings)) and writes OUT with:

  input_ids, attention_mask, token_type_ids   i64 [batch, seq]
  last_hidden_state                           f64 [batch, seq, hidden]
  pooler_output                               f64 [batch, hidden] (if the model has a pooler)
  mean_pooled                                 f64 [batch, hidden] (mask-weighted mean of the above)
  r                                           f64 [batch, hidden] (N(0,1), torch seed 7)
  grad.<name>                                 f64, d sum(mean_pooled * r) / d <name>, for GRADS
"""

import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["USE_HUB_KERNELS"] = "0"

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import BertModel  # noqa: E402

SENTENCES = [
    "The film is good.",
    "A very bad movie!",
    "Hi",
    "It was the best story I have ever seen, and she made it funny.",
    "Not funny at all.",
    "This movie is great, great, great; one of the best.",
    "Why?",
    "They love the film but the time is too long",
    "An ugly, boring mess -- 2 hours I will never get back.",
    "Caf\u00e9 culture in \u65e5\u672c (Japan) is the story.",
    "he has made more films than you have.",
    "So it goes.",
    "We watched it twice in 1999 and 2024: still funny, still sad, still true.",
    "Acting: superb. Script: forgettable.",
    "A",
    "who is the one that never made a bad movie?",
    "Just too long, and with too little to say about its characters or their world.",
    "Loving, warm and very human.",
    "Stunning!!!",
    "The plot twists are predictable but the cast sells every one of them with charm.",
]
PAIRS = [
    ("Is it good?", "Yes, very good."),
    ("A story of love.", "A story of loss and time."),
    ("Best film ever", "Not even close"),
    ("Short.", "A considerably longer second segment that goes on for a while."),
]
GRADS = [
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "encoder.layer.0.attention.self.query.weight",
    "encoder.layer.0.attention.output.dense.bias",
    "encoder.layer.1.intermediate.dense.weight",
    "encoder.layer.1.output.LayerNorm.weight",
]


def main():
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} DIR OUT.safetensors")
    directory, out = sys.argv[1:]
    model = BertModel.from_pretrained(directory, attn_implementation="eager", use_kernels=False)
    model = model.double().eval()
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=min(128, model.config.max_position_embeddings))
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    encs = tok.encode_batch(SENTENCES + PAIRS)
    ids = torch.tensor([e.ids for e in encs], dtype=torch.int64)
    mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.int64)
    types = torch.tensor([e.type_ids for e in encs], dtype=torch.int64)

    params = dict(model.named_parameters())
    missing = [n for n in GRADS if n not in params]
    if missing:
        sys.exit(f"error: {directory} has no parameters {missing}")
    model.zero_grad()
    outputs = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    hidden = outputs.last_hidden_state
    m = mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    r = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (mean * r).sum().backward()

    tensors = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": types,
        "last_hidden_state": hidden.detach(),
        "mean_pooled": mean.detach(),
        "r": r,
    }
    if outputs.pooler_output is not None:
        tensors["pooler_output"] = outputs.pooler_output.detach()
    for name in GRADS:
        tensors["grad." + name] = params[name].grad.detach()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out, metadata={"format": "pt"})
    print(f"wrote {out}: batch {ids.shape[0]}, seq {ids.shape[1]}, "
          f"{int(mask.sum())} tokens, hidden {hidden.shape[-1]}", file=sys.stderr)


if __name__ == "__main__":
    main()
