#!/usr/bin/env python3
"""Writes the TorchScript modules the tests load into DIR (committed in tests/data/torchscript, so
the test suite needs no Python):

    PYTHONPATH="$(dirname "$(scripts/libtorch.sh)")" python3 scripts/make_torchscript_fixtures.py tests/data/torchscript

- `mlp.pt`: metaloop's MLP 64-32-10 with the initial values of `[model] kind = "mlp"`,
  `hidden = [32]` for job seed 0 (scripts/export_torchscript.py), for the parity tests;
- `tiny-transformer.pt`: the export script's transformer classifier (width 32, one layer, 2
  classes, dropout 0.1) over the vocabulary of tests/data/tiny-bert/tokenizer.json;
- modules that `validate` must refuse, each for one reason: `no-params.pt` (nothing to train),
  `two-inputs.pt` (forward takes two tensors), `three-classes.pt` (logits [n, 3] for a 10-class
  job), `tuple.pt` (forward returns a tuple), `f64.pt` (f64 parameters).

Deterministic: the same torch gives the same bytes (export_torchscript.save).
"""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export_torchscript import TextClassifier, export, mlp, save, vocab_size  # noqa: E402  (first: it fixes PYTHONHASHSEED)

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402


class NoParams(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :10] * 2.0


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.head(x) + y


class Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor):
        h = self.head(x)
        return h, h


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    export(mlp(64, [32], 10, 0), torch.rand(5, 64), os.path.join(out, "mlp.pt"), 10)
    # The refused ones are saved as they are, without export()'s checks.
    save(torch.jit.script(NoParams()), os.path.join(out, "no-params.pt"))
    save(torch.jit.script(TwoInputs()), os.path.join(out, "two-inputs.pt"))
    save(torch.jit.script(mlp(64, [8], 3, 0)), os.path.join(out, "three-classes.pt"))
    save(torch.jit.script(Tuple()), os.path.join(out, "tuple.pt"))
    save(torch.jit.script(mlp(64, [8], 10, 0).double()), os.path.join(out, "f64.pt"))
    # A transformer over the tiny BERT's vocabulary, for the text tests (synthetic sentences).
    torch.manual_seed(0)
    here = os.path.dirname(os.path.abspath(__file__))
    vocab = vocab_size(os.path.join(here, "..", "tests", "data", "tiny-bert", "tokenizer.json"))
    ids = torch.randint(vocab, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 4:] = 0
    export(TextClassifier(vocab, 2, dim=32, layers=1, heads=2, max_len=64, dropout=0.1), (ids, mask),
           os.path.join(out, "tiny-transformer.pt"), 2)


if __name__ == "__main__":
    main()
