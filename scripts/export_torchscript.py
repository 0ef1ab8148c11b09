#!/usr/bin/env python3
"""Exports a PyTorch module as TorchScript for `[model] kind = "torchscript"`, after the checks a
module must pass to be trained by metaloop (docs/torchscript.md):

    PYTHONPATH="$(dirname "$(scripts/libtorch.sh)")" python3 scripts/export_torchscript.py cnn OUT.pt
    PYTHONPATH="$(dirname "$(scripts/libtorch.sh)")" python3 scripts/export_torchscript.py mlp OUT.pt --seed 0
    PYTHONPATH="$(dirname "$(scripts/libtorch.sh)")" python3 scripts/export_torchscript.py transformer OUT.pt \
        --tokenizer data/text/all-MiniLM-L6-v2/tokenizer.json --classes 2

(`scripts/libtorch.sh` prints the libtorch directory of the torch wheel `./dev` installed; its
parent holds the `torch` package, the same torch 2.11 metaloop links.)

Three example modules, two over dense features (the bundled digits: 64 pixels, 10 classes):
- `cnn`: a small convolutional network over the 8×8 images (two 3×3 convolutions, max pooling,
  a linear head), initialised by torch from --seed;
- `mlp`: metaloop's own MLP (`l0.weight`, `l0.bias`, …; x·Wᵀ + b with ReLU between layers), with
  the exact initial values `[model] kind = "mlp"` starts from for job seed --seed (SplitMix64,
  uniform ±1/√fan_in, the same arithmetic as common/src/model.rs), so a job with this module
  and one with the native MLP can be compared value for value;

and one over text:
- `transformer`: a small transformer encoder classifier (token and position embeddings,
  pre-LayerNorm layers that ignore padding, mean pooling, a linear head) whose
  `forward(ids, mask)` takes the token ids and attention mask metaloop builds with the job's
  `[model] tokenizer` (--tokenizer sets the vocabulary; --max-len must cover the job's max_len).

Your own module: write it as an `nn.Module` whose `forward(x)` takes features `[n, f]` (f32),
or `forward(ids, mask)` token ids and mask `[n, len]` (i64), and returns logits
`[n, classes]`; then call `export(module, example, path, classes)` from this file (`example`: a
batch, or a tuple of ids and mask), or do what it does: script (or trace) it, and check it.

The checks (each failure is an error that says what to change):
1. every parameter is named (`named_parameters`), f32, and requires a gradient; buffers that
   change in training (BatchNorm's running statistics) are refused: metaloop ships and averages
   parameters only, so they would silently differ between workers;
2. forward returns one f32 tensor `[n, classes]` for the example batch;
3. forward is deterministic in eval mode (two passes agree bit for bit);
4. the saved file loads back with `torch.jit.load` and gives the same logits.

The file is written without TorchScript's debug records (they hold the exporting machine's source
paths) and with a serialization id derived from its content: the same module, the same bytes.
"""

import argparse
import hashlib
import io
import json
import os
import sys
import warnings
import zipfile

# TorchScript writes a module's constants in set order: fix Python's string hashing so the same
# module is written the same way every time (the process restarts itself once to set it).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable] + sys.argv)

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
from torch import nn  # noqa: E402


class SplitMix64:
    """metaloop's SplitMix64 (proto/src/rng.rs)."""

    def __init__(self, seed):
        self.state = seed & (2**64 - 1)

    def next_u64(self):
        mask = 2**64 - 1
        self.state = (self.state + 0x9E3779B97F4A7C15) & mask
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)


def linear_init(rng, n, fan_in):
    """metaloop's `linear_init`: uniform in ±1/√fan_in, computed in f64 and rounded to f32."""
    bound = 1.0 / fan_in ** 0.5
    return [((rng.next_u64() >> 11) / float(1 << 53) * 2.0 - 1.0) * bound for _ in range(n)]


class Layer(nn.Module):
    """One linear layer's parameters, named `weight` [out, in] and `bias` [out] as metaloop's."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out))


class Mlp(nn.Module):
    """metaloop's MLP: x·Wᵀ + b, ReLU between layers, parameters l0.weight, l0.bias, …"""

    def __init__(self, sizes):
        super().__init__()
        self.layers = len(sizes) - 1
        for i in range(self.layers):
            self.add_module(f"l{i}", Layer(sizes[i], sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        i = 0
        for layer in self.children():
            h = h.matmul(layer.weight.t()) + layer.bias
            if i + 1 < self.layers:
                h = h.relu()
            i += 1
        return h


def mlp(inputs, hidden, classes, seed):
    """The MLP with the initial values metaloop's `kind = "mlp"` has for job seed `seed`."""
    sizes = [inputs] + hidden + [classes]
    model = Mlp(sizes)
    rng = SplitMix64(seed)
    with torch.no_grad():
        for i in range(len(sizes) - 1):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            layer = getattr(model, f"l{i}")
            w = linear_init(rng, fan_out * fan_in, fan_in)
            b = linear_init(rng, fan_out, fan_in)
            layer.weight.copy_(torch.tensor(w, dtype=torch.float64).float().reshape(fan_out, fan_in))
            layer.bias.copy_(torch.tensor(b, dtype=torch.float64).float())
    return model


class DigitsCnn(nn.Module):
    """A small CNN over the 8×8 digit images (features are the 64 pixels, row-major)."""

    def __init__(self, classes, channels=16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, 8, 8)
        h = torch.relu(self.conv1(h))
        h = torch.relu(self.conv2(h))
        h = torch.max_pool2d(h, 2)
        return self.head(h.flatten(1))


class TextClassifier(nn.Module):
    """A small transformer encoder over token ids: token and position embeddings, pre-LayerNorm
    encoder layers that ignore padding, the mean over the attended tokens, a linear head.
    forward(ids [n, len] i64, mask [n, len] i64: 1 for a token, 0 for padding) -> logits."""

    def __init__(self, vocab, classes, dim=64, layers=2, heads=4, max_len=128, dropout=0.1):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        h = self.tokens(ids) + self.positions(pos)
        h = self.encoder(h, src_key_padding_mask=mask == 0)
        h = self.norm(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(pooled)


def vocab_size(tokenizer_json):
    """Rows the token embedding needs for a Hugging Face tokenizer.json: its largest id + 1."""
    with open(tokenizer_json) as f:
        t = json.load(f)
    ids = list(t["model"]["vocab"].values()) + [a["id"] for a in t.get("added_tokens", [])]
    return max(ids) + 1


def save(scripted, path):
    """`torch.jit.save`, then the archive rewritten without its debug records (`*.debug_pkl`:
    the absolute paths of the exporting machine's source files, for tracebacks; libtorch loads
    a module without them) and with a serialization id derived from the content instead of a
    random one, so the same module gives the same bytes on every machine."""
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    with zipfile.ZipFile(buf) as zin:
        entries = [(i, zin.read(i.filename)) for i in zin.infolist() if not i.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256()
    for info, data in entries:
        if not info.filename.endswith("/.data/serialization_id"):
            digest.update(info.filename.encode() + b"\0" + data)
    ident = str(int(digest.hexdigest()[:32], 16)).zfill(40).encode()
    tmp = path + ".partial"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for info, data in entries:
            zout.writestr(info, ident if info.filename.endswith("/.data/serialization_id") else data)
    os.replace(tmp, path)


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def export(module, example, path, classes):
    """Scripts `module`, checks it as metaloop needs, and saves it to `path`."""
    module = module.float().eval()
    scripted = torch.jit.script(module)
    names = [n for n, _ in scripted.named_parameters()]
    if not names:
        fail("the module has no parameters to train")
    for name, p in scripted.named_parameters():
        if p.dtype != torch.float32:
            fail(f"parameter {name} is {p.dtype}; metaloop trains f32 parameters (call .float())")
        if not p.requires_grad:
            fail(f"parameter {name} does not require a gradient; metaloop trains every parameter")
    for name, b in scripted.named_buffers():
        if b.is_floating_point():
            fail(f"buffer {name} would change in training (e.g. BatchNorm's running statistics) but "
                 "metaloop ships and averages parameters only; use GroupNorm/LayerNorm or freeze it")
    example = example if isinstance(example, tuple) else (example,)
    rows = example[0].shape[0]
    with torch.no_grad():
        out = scripted(*example)
        again = scripted(*example)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or list(out.shape) != [rows, classes]:
        fail(f"forward must return f32 logits [{rows}, {classes}], got "
             f"{getattr(out, 'dtype', type(out))} {list(getattr(out, 'shape', []))}")
    if not torch.equal(out, again):
        fail("forward is not deterministic in eval mode (two passes differ)")
    save(scripted, path)
    loaded = torch.jit.load(path)
    with torch.no_grad():
        if not torch.equal(loaded(*example), out):
            fail(f"{path} does not give the same logits after torch.jit.load")
    print(f"{path}: {len(names)} parameters ({sum(p.numel() for p in scripted.parameters())} values): "
          + ", ".join(names))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["cnn", "mlp", "transformer"])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0, help="mlp: metaloop's job seed; cnn: torch's seed")
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--hidden", type=int, nargs="*", default=[256], help="mlp: hidden layer widths")
    ap.add_argument("--channels", type=int, default=16, help="cnn: channels of the first convolution")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--tokenizer", help="transformer: the tokenizer.json the job tokenizes with (sets the vocabulary)")
    ap.add_argument("--dim", type=int, default=64, help="transformer: width")
    ap.add_argument("--layers", type=int, default=2, help="transformer: encoder layers")
    ap.add_argument("--heads", type=int, default=4, help="transformer: attention heads")
    ap.add_argument("--max-len", type=int, default=128, help="transformer: positions (>= the job's model.max_len)")
    ap.add_argument("--dropout", type=float, default=0.1, help="transformer: dropout in training")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    if args.kind == "transformer":
        if not args.tokenizer:
            fail("a transformer needs --tokenizer (the job's tokenizer.json) for its vocabulary")
        vocab = vocab_size(args.tokenizer)
        module = TextClassifier(vocab, args.classes, args.dim, args.layers, args.heads, args.max_len, args.dropout)
        ids = torch.randint(vocab, (5, 12))
        mask = torch.ones(5, 12, dtype=torch.long)
        mask[1, 7:] = 0
        mask[3, 2:] = 0
        export(module, (ids, mask), args.out, args.classes)
        return
    if args.kind == "mlp":
        module = mlp(args.inputs, args.hidden, args.classes, args.seed)
    else:
        if args.inputs != 64:
            fail("the cnn reads 8×8 images: --inputs must be 64")
        module = DigitsCnn(args.classes, args.channels)
    example = torch.rand(5, args.inputs)
    export(module, example, args.out, args.classes)


if __name__ == "__main__":
    main()
