#!/usr/bin/env python3
"""Plain-PyTorch reference for `metaloop bench step`: the worker's assignment, timed.

Mirrors one *assignment* of the Rust worker (worker/src/train.rs `Trainer::run`, with
worker/src/inner.rs and worker/src/signal/) as a competent PyTorch user would write it: data on
the device, `index_select` batches, `torch.optim.SGD` / `torch.optim.AdamW`,
`torch.nn.utils.clip_grad_norm_`, `torch.autograd.grad` for the double backward. The model is a
parameter of every function (`MlpNet`: the functional MLP; `BertNet`: transformers' `BertModel`
with eager attention, mean pooling over the attention mask and a linear head, called directly
on its own parameters and through `torch.func.functional_call` on shifted ones). Per assignment:
  1. copy the host base θ into the model (`copy_` under no_grad); a fresh optimizer (momentum
     buffers, or AdamW's moments and step count); the model in train mode (dropout as its config);
  2. `steps` optimizer steps (SGD with lr, momentum, coupled weight decay = the worker's
     `sgd_step`; or torch.optim.AdamW = its `adamw_step`; clipping the global gradient norm when
     asked) on mixture batches: per_domain = max(1, batch_size // K) rows of every domain, drawn
     without replacement, reshuffled each epoch; a row of domain k weighs w_k / (K·rows_k);
     loss = Σ_i weight_i · CE_i, read back every step (`.item()`, the divergence check);
     with a rescaler each weight is multiplied by Ω's output on the row's features (taken in
     eval mode), normalised to batch mean 1 if asked (`Omega::weights`, common/src/features.rs
     `of_model`); text batches are padded to their longest row (dynamic padding);
  3. delta = θ_after − θ_before on the host, float32; the model in eval mode from here;
  4. meta signals (worker/src/signal/): with a meta set its mean CE on the assignment's meta
     batch (`meta_batch` rows, or all); with a hypergradient v = ∇θ L_meta and per domain
     d_sum = Σ_i ⟨∇θ ℓ_i, v⟩ over a probe of the shard, by double backward ("exact") or central
     finite difference ("fd", ε = 0.01/‖v‖);
  5. with a rescaler, Ω's meta-gradient through one virtual SGD step of size `virtual_lr`
     (worker/src/rescaler.rs `meta_gradient`), clean-meta or self-taught, copied to the host.

Run:  PYTHONPATH=$HOME/.cache/metaloop/torch-2.11.0 python3 scripts/bench_step.py SPEC.json
      python3 scripts/bench_step.py --self-test   (float64 checks; exit 1 on failure)
SPEC.json is written by the Rust side (keys in `run_spec`). The last stdout line is JSON:
  {"seconds", "assignments", "steps", "torch", "threads", "peak_rss", "check": {...}}, or with
  "check": true in the spec {"check": {"mean_loss", "delta_norm", "meta_loss", "d_sum",
  "omega_grad_norm"}, "torch", "threads"} from one untimed assignment on domains of exactly
  per_domain rows (order-free); elsewhere "check" is one extra untimed assignment.
In check mode every probe is the whole domain. Deliberately idiomatic rather than literal:
the data sets and Ω live on the device (the worker gathers rows on the host each step), Ω's
weights are not copied out for a histogram, and F.linear stands for matmul + bias.
Text data arrive as token ids `ids` and `mask` [rows, max_len] (padded by the Rust side with
the tokenizer's pad id), with `y`: both sides train on the same ids. Needs only torch and the
standard library for the MLP; the BERT model also needs transformers (`scripts/pydeps`).
"""
import ctypes
import json
import math
import os
import resource
import struct
import sys
import tempfile
import time
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # numpy is not needed
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FD_RADIUS = 0.01  # primitives::FD_RADIUS
SEED = 20261129
DTYPES = {"F64": torch.float64, "F32": torch.float32, "I64": torch.int64, "I32": torch.int32,
          "U8": torch.uint8}
STOCHASTIC = ("label-prob-mean", "label-prob-spread")


# ---------------------------------------------------------------- safetensors, by hand
def read_safetensors(path):
    """{name: CPU tensor} of a safetensors file (little-endian host assumed)."""
    with open(path, "rb") as f:
        raw = bytearray(f.read())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        count = (end - begin) // dtype.itemsize
        t = torch.frombuffer(raw, dtype=dtype, offset=8 + n + begin, count=count) if count \
            else torch.empty(0, dtype=dtype)
        out[name] = t.clone().reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    """Writes {name: tensor} (for tests)."""
    header, blobs, at = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        b = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())
        code = next(k for k, v in DTYPES.items() if v == t.dtype)
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def load_mlp(path, sizes=None):
    """MLP parameters [l0.weight, l0.bias, l1.weight, ...] from a file, checked against sizes."""
    t = read_safetensors(path)
    layers = len(t) // 2
    params = [t[f"l{i}.{kind}"].float() for i in range(layers) for kind in ("weight", "bias")]
    if sizes is not None:
        want = [s for a, b in zip(sizes, sizes[1:]) for s in ([b, a], [b])]
        got = [list(p.shape) for p in params]
        if got != want:
            raise SystemExit(f"{path}: parameter shapes {got}, the model spec needs {want}")
    return params


# ---------------------------------------------------------------- models
def mlp(params, x):
    """Mlp::forward: h = h @ W.T + b, ReLU between layers (no dropout: the benchmark has none)."""
    h = x
    for i in range(0, len(params), 2):
        h = F.linear(h, params[i], params[i + 1])
        if i + 2 < len(params):
            h = F.relu(h)
    return h


class MlpNet:
    """The MLP as a pure function of its parameter list; `params` are leaves on the device."""

    def __init__(self, base=None, device="cpu"):
        self.base = base  # host copy, as the worker holds it
        self.params = [b.to(device, copy=True).requires_grad_() for b in base] if base else None

    def forward(self, params, x):
        return mlp(params, x)

    def train(self, mode):
        pass


class BertNet:
    """transformers' BertModel (eager attention, no pooler), the mask-weighted mean of its last
    hidden state, and a linear head (common/src/classifier.rs `BertClassifier`, mean pooling).
    `params` are the module's own parameters then the head's, in the module's order; `base`
    their host copies from the parameter file (encoder by Hugging Face name, `head.*`)."""

    def __init__(self, config_path, params_path, device):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("USE_HUB_KERNELS", "0")
        from transformers import BertConfig, BertModel
        with open(config_path) as f:
            config = BertConfig.from_dict(json.load(f), attn_implementation="eager")
        self.module = BertModel(config, add_pooling_layer=False).to(device)
        self.names = [n for n, _ in self.module.named_parameters()]
        tensors = read_safetensors(params_path)
        want = set(self.names) | {"head.weight", "head.bias"}
        if set(tensors) != want:
            raise SystemExit(f"{params_path}: parameters {sorted(set(tensors) ^ want)} do not fit the config")
        self.base = [tensors[n].float() for n in self.names + ["head.weight", "head.bias"]]
        head = [tensors[n].float().to(device).requires_grad_() for n in ("head.weight", "head.bias")]
        self.params = [p for _, p in self.module.named_parameters()] + head
        for p, b in zip(self.params, self.base):
            if p.shape != b.shape:
                raise SystemExit(f"{params_path}: a tensor of shape {list(b.shape)} for {list(p.shape)}")

    def forward(self, params, x):
        ids, mask = x
        if params is self.params:  # the usual call, on the module's own parameters
            h = self.module(input_ids=ids, attention_mask=mask).last_hidden_state
        else:  # θ + εu, a virtual step: the same module on other tensors
            h = torch.func.functional_call(self.module, dict(zip(self.names, params[:-2])),
                                           kwargs={"input_ids": ids, "attention_mask": mask}).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.linear(pooled, params[-2], params[-1])

    def train(self, mode):
        self.module.train(mode)


MLP = MlpNet()  # Ω, and the self-test's θ


# ---------------------------------------------------------------- losses, directional
def per_sample_loss(net, params, x, y):
    return F.cross_entropy(net.forward(params, x), y, reduction="none")


def directional_exact(net, params, x, y, u):
    """c_i = ⟨∇θ ℓ_i, u⟩ by one double backward: c = ∂⟨∇θ Σ w_i ℓ_i, u⟩/∂w at w = 1."""
    losses = per_sample_loss(net, params, x, y)
    w = torch.ones_like(losses, requires_grad=True)
    g = torch.autograd.grad((w * losses).sum(), params, create_graph=True)
    dot = sum((gi * ui).sum() for gi, ui in zip(g, u))
    return torch.autograd.grad(dot, w)[0]


@torch.no_grad()
def directional_fd(net, params, x, y, u, radius=FD_RADIUS):
    """c_i ≈ (ℓ_i(θ + εu) − ℓ_i(θ − εu)) / 2ε, ε = radius/‖u‖, in float64 (θ is not touched)."""
    size = math.sqrt(torch.stack([t.double().square().sum() for t in u]).sum().item())
    if size == 0.0:
        return torch.zeros(y.shape[0], dtype=torch.float64, device=y.device)
    eps = radius / size
    plus = per_sample_loss(net, [p + ui * eps for p, ui in zip(params, u)], x, y).double()
    minus = per_sample_loss(net, [p + ui * -eps for p, ui in zip(params, u)], x, y).double()
    return (plus - minus) / (2.0 * eps)


def directional(method, net, params, x, y, u):
    return directional_exact(net, params, x, y, u) if method == "exact" else directional_fd(net, params, x, y, u)


# ---------------------------------------------------------------- Ω: features, weights, meta-gradient
def compute_features(logits, y, names, progress, stochastic=None):
    """features::compute: columns [n, F] (loss and entropy / ln C)."""
    logits = logits.float()
    ln_c = math.log(max(logits.shape[1], 2))
    logp = logits.log_softmax(-1)
    p = logp.exp()
    label_logp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    cols = []
    for name in names:
        if name == "loss":
            cols.append(-label_logp / ln_c)
        elif name == "label-prob":
            cols.append(label_logp.exp())
        elif name == "entropy":
            cols.append(-(p * logp).sum(-1) / ln_c)
        elif name == "margin":
            cols.append(label_logp.exp() - p.scatter(1, y.unsqueeze(1), -1.0).amax(-1))
        elif name == "progress":
            cols.append(torch.full_like(label_logp, progress))
        elif name == "label-prob-mean":
            cols.append(stochastic.mean(0) if stochastic is not None else label_logp.exp())
        elif name == "label-prob-spread":
            ok = stochastic is not None and stochastic.shape[0] > 1
            cols.append(stochastic.std(0, unbiased=False) if ok else torch.zeros_like(label_logp))
        else:
            raise SystemExit(f"unknown feature `{name}`")
    return torch.stack(cols, 1)


@torch.no_grad()
def features_of(net, params, x, y, names, progress, passes):
    """features::of_model: one deterministic pass (eval mode), plus `passes` stochastic ones
    (train mode) if needed; leaves the model in eval mode."""
    net.train(False)
    logits = net.forward(params, x)
    stochastic = None
    if any(n in STOCHASTIC for n in names):
        net.train(True)
        stochastic = torch.stack([F.log_softmax(net.forward(params, x).float(), -1).gather(1, y.unsqueeze(1))
                                  .squeeze(1).exp() for _ in range(max(passes, 1))])
        net.train(False)
    return compute_features(logits, y, names, progress, stochastic)


def omega_raw(omega, features):
    """rescaler::omega_weights: sigmoid(Ω(f)) as [n]."""
    return torch.sigmoid(MLP.forward(omega, features.to(omega[0].dtype))).squeeze(1)


def batch_weights(raw, normalize):
    return raw / raw.mean().clamp_min(1e-12) if normalize else raw


def omega_meta_gradient(net, params, omega, x, y, f, val, alpha, normalize, method):
    """rescaler::meta_gradient: θ' = θ − α∇θ mean(w̃·ℓ(θ)), u = ∇θ' L_val(θ'),
    c_i = ⟨∇θ ℓ_i(θ), u⟩, ∇Ω of −(α/n) Σ c_i w̃_i (+ L_val's direct term, self-taught).
    `val` is ("clean", vx, vy) or ("self-taught", vx, vy, vf)."""
    n = y.shape[0]
    w = batch_weights(omega_raw(omega, f), normalize)
    inner = (per_sample_loss(net, params, x, y) * w.detach()).mean()
    g = torch.autograd.grad(inner, params)
    stepped = [(p.detach() - gi * alpha).requires_grad_() for p, gi in zip(params, g)]
    direct = None
    if val[0] == "clean":
        loss = per_sample_loss(net, stepped, val[1], val[2]).mean()
    else:
        lv = per_sample_loss(net, stepped, val[1], val[2])
        wv = omega_raw(omega, val[3])
        loss = (lv * wv.detach()).sum() / wv.detach().sum()
        direct = (lv.detach() * wv).sum() / wv.sum()
    u = torch.autograd.grad(loss, stepped)
    c = directional(method, net, params, x, y, u).to(w.dtype).detach()
    objective = (c * w).sum() * (-alpha / n)
    if direct is not None:
        objective = objective + direct
    return torch.autograd.grad(objective, omega)


# ---------------------------------------------------------------- the benchmark
def cat(xs):
    """Rows of several sets, features or (ids, mask) of one padded width, concatenated."""
    return tuple(torch.cat(parts) for parts in zip(*xs)) if isinstance(xs[0], tuple) else torch.cat(xs)


def to(x, device):
    return tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)


def gather(x, idx):
    """Rows `idx` of features, or of (ids, mask) cut to the batch's longest row (dynamic
    padding, as the worker pads each batch)."""
    if not isinstance(x, tuple):
        return x.index_select(0, idx)
    ids, mask = (t.index_select(0, idx) for t in x)
    width = int(mask.sum(1).max())
    return ids[:, :width], mask[:, :width]


def load_set(path):
    """(inputs, labels) of a data file: `x` features, or text `ids` and `mask`."""
    d = read_safetensors(path)
    x = (d["ids"].long(), d["mask"].long()) if "ids" in d else d["x"].float()
    return x, d["y"].long()


class Mixture:
    """Batches::Mixture over K domain tensors concatenated on the device: each domain keeps its
    own shuffled order and cursor (Sampler), reshuffled when the next draw would overrun."""

    def __init__(self, xs, ys, weights, batch_size, gen, device):
        k = len(xs)
        self.gen, self.device = gen, device
        self.sizes = [len(y) for y in ys]
        self.offsets = [sum(self.sizes[:i]) for i in range(k)]
        self.take = [min(max(1, batch_size // k), n) for n in self.sizes]
        self.x, self.y = to(cat(xs), device), torch.cat(ys).to(device)
        self.w = torch.cat([torch.full((t,), float(w) / (k * t))
                            for w, t in zip(weights, self.take)]).to(device)

    def reset(self):
        self.orders = [self._shuffle(i) for i in range(len(self.sizes))]
        self.cursors = [0] * len(self.sizes)

    def _shuffle(self, i):
        return (torch.randperm(self.sizes[i], generator=self.gen) + self.offsets[i]).to(self.device)

    def next(self):
        parts = []
        for i, t in enumerate(self.take):
            if self.cursors[i] + t > self.sizes[i]:
                self.orders[i], self.cursors[i] = self._shuffle(i), 0
            parts.append(self.orders[i][self.cursors[i]:self.cursors[i] + t])
            self.cursors[i] += t
        idx = torch.cat(parts)
        return gather(self.x, idx), self.y.index_select(0, idx), self.w

    def draw(self):
        """Trainer::draw: a fresh sampler per domain, its first per_domain rows."""
        idx = torch.cat([(torch.randperm(n, generator=self.gen)[:t] + o) for n, t, o
                         in zip(self.sizes, self.take, self.offsets)]).to(self.device)
        return gather(self.x, idx), self.y.index_select(0, idx)

    def probe(self, i, rows):
        """Trainer::probe_rows: the first `rows` rows of a seeded permutation of domain i."""
        idx = (torch.randperm(self.sizes[i], generator=self.gen)[:max(rows, 1)] + self.offsets[i])
        idx = idx.to(self.device)
        return gather(self.x, idx), self.y.index_select(0, idx)


class Bench:
    def __init__(self, spec):
        self.spec, self.dev = spec, torch.device(spec["device"])
        self.check = bool(spec.get("check"))
        m, inner = spec["model"], spec["inner"]
        if m.get("kind", "mlp") == "mlp":
            sizes = [m["inputs"], *m["hidden"], m["classes"]]
            self.net = MlpNet(load_mlp(spec["params"], sizes), self.dev)
        elif m["kind"] == "bert":
            self.net = BertNet(m["config"], spec["params"], self.dev)
        else:
            raise SystemExit(f"unknown model kind `{m['kind']}`")
        self.base, self.params = self.net.base, self.net.params
        data = [load_set(p) for p in spec["domains"]]
        self.gen = torch.Generator().manual_seed(SEED)
        self.batches = Mixture([d[0] for d in data], [d[1] for d in data],
                               spec["weights"], inner["batch_size"], self.gen, self.dev)
        if self.check and any(n != t for n, t in zip(self.batches.sizes, self.batches.take)):
            print(f"warning: check run but domain rows {self.batches.sizes} != per_domain", file=sys.stderr)
        meta = load_set(spec["meta"]) if spec.get("meta") else None
        self.meta = (to(meta[0], self.dev), meta[1].to(self.dev)) if meta else None
        self.meta_batch = int(spec.get("meta_batch") or 0)
        self.steps, self.inner = int(inner["steps"]), inner
        self.hyper, self.resc = spec.get("hypergradient"), spec.get("rescaler")
        if self.hyper is not None:
            self.hyper = dict(self.hyper, directional=method_name(self.hyper["directional"]))
        if self.resc is not None:
            self.resc = dict(self.resc, directional=method_name(self.resc["directional"]))
            self.omega_base = load_mlp(self.resc["params"])
            self.omega = [b.to(self.dev, copy=True).requires_grad_() for b in self.omega_base]
        if self.resc and self.resc["mode"] not in ("clean-meta", "self-taught"):
            raise SystemExit(f"unknown rescaler mode `{self.resc['mode']}`")
        if (self.hyper or (self.resc and self.resc["mode"] == "clean-meta")) and self.meta is None:
            raise SystemExit("the spec asks for a hypergradient or clean-meta Ω but has no meta set")

    def features(self, x, y):
        r = self.resc
        return features_of(self.net, self.params, x, y, r["features"], float(r["progress"]), int(r["passes"]))

    def optimizer(self):
        """A fresh inner optimizer (TrainingData's InnerSpec: SGD or AdamW)."""
        inner = self.inner
        if inner.get("optimizer", "sgd") == "sgd":
            return torch.optim.SGD(self.params, lr=inner["lr"], momentum=inner["momentum"],
                                   weight_decay=inner["weight_decay"])
        return torch.optim.AdamW(self.params, lr=inner["lr"], betas=tuple(inner["betas"]), eps=inner["eps"],
                                 weight_decay=inner["weight_decay"])

    def meta_rows(self):
        """TrainingData::meta_batch: `meta_batch` rows of the meta set, drawn afresh per
        assignment, or all of it."""
        mx, my = self.meta
        n = my.shape[0]
        if 0 < self.meta_batch < n:
            idx = torch.randperm(n, generator=self.gen)[:self.meta_batch].to(self.dev)
            return gather(mx, idx), my.index_select(0, idx)
        return mx, my

    def assignment(self):
        """One Trainer::run: its outputs, on the host."""
        params, inner = self.params, self.inner
        with torch.no_grad():
            for p, b in zip(params, self.base):
                p.copy_(b)
            if self.resc:
                for q, b in zip(self.omega, self.omega_base):
                    q.copy_(b)
        opt = self.optimizer()  # fresh state
        clip = inner.get("clip_norm")
        self.batches.reset()
        self.net.train(True)
        loss_sum = 0.0
        for step in range(self.steps):
            x, y, w = self.batches.next()
            if self.resc:
                with torch.no_grad():
                    f = self.features(x, y)
                    self.net.train(True)
                    w = w * batch_weights(omega_raw(self.omega, f), self.resc["normalize"])
            opt.zero_grad()
            loss = (per_sample_loss(self.net, params, x, y) * w).sum()
            value = loss.item()
            if not math.isfinite(value):
                raise SystemExit(f"training diverged: non-finite loss at inner step {step}")
            loss_sum += value
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
        self.net.train(False)
        delta = [p.detach().cpu() - b for p, b in zip(params, self.base)]  # host float32
        out = {"mean_loss": loss_sum / max(self.steps, 1), "delta": delta,
               "meta_loss": None, "d_sum": None, "omega_grad": None}
        meta = self.meta_rows() if self.meta is not None else None
        if meta is not None:
            mx, my = meta
            with torch.set_grad_enabled(self.hyper is not None):
                meta_loss = F.cross_entropy(self.net.forward(params, mx), my)
            out["meta_loss"] = meta_loss.item()
            if self.hyper is not None:
                v = torch.autograd.grad(meta_loss, params)
                out["d_sum"] = []
                for i, n in enumerate(self.batches.sizes):
                    rows = n if self.check else int(self.hyper["probe"])
                    px, py = self.batches.probe(i, rows)
                    c = directional(self.hyper["directional"], self.net, params, px, py, v)
                    out["d_sum"].append(c.double().sum().item())
        if self.resc:
            r = self.resc
            x, y = self.batches.draw()
            f = self.features(x, y)
            if r["mode"] == "clean-meta":
                val = ("clean", *meta)
            else:
                vx, vy = self.batches.draw()
                val = ("self-taught", vx, vy, self.features(vx, vy))
            alpha = float(inner.get("virtual_lr") or inner["lr"])  # one plain SGD step
            grads = omega_meta_gradient(self.net, params, self.omega, x, y, f, val, alpha,
                                        r["normalize"], r["directional"])
            out["omega_grad"] = [g.float().cpu() for g in grads]
        return out

    def sync(self):
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)


def method_name(m):
    if m in ("exact", "fd", "finite-difference"):
        return "exact" if m == "exact" else "fd"
    raise SystemExit(f"unknown directional method `{m}`")


def norm(tensors):
    return None if tensors is None else math.sqrt(sum(t.double().square().sum().item() for t in tensors))


def check_of(out):
    """The order-free summary the Rust side compares against its own."""
    return {"mean_loss": out["mean_loss"], "delta_norm": norm(out["delta"]), "meta_loss": out["meta_loss"],
            "d_sum": out["d_sum"], "omega_grad_norm": norm(out["omega_grad"])}


def run_spec(spec):
    """Spec keys read: device, threads, model{kind: mlp, inputs, hidden, classes | kind: bert,
    config (a config.json path), classes}, params, domains, meta, meta_batch, weights,
    inner{steps, batch_size, lr, momentum, weight_decay, optimizer (sgd | adamw), betas, eps,
    clip_norm, virtual_lr}, hypergradient{directional, probe}, rescaler{params, features, mode,
    normalize, passes, directional, progress}, assignments, warmup, check. The result's
    peak_rss: this process's peak resident set size in bytes (getrusage)."""
    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    bench = Bench(spec)
    if bench.check:  # (torch and threads too: the Rust side reads the version from this run)
        return {"check": check_of(bench.assignment()), "torch": torch.__version__,
                "threads": torch.get_num_threads()}
    for _ in range(int(spec.get("warmup", 0))):
        bench.assignment()
    bench.sync()
    a = int(spec["assignments"])
    start = time.perf_counter()
    for _ in range(a):
        bench.assignment()
    bench.sync()
    seconds = time.perf_counter() - start
    check = check_of(bench.assignment())
    return {"seconds": seconds, "assignments": a, "steps": a * bench.steps, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "check": check,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


# ---------------------------------------------------------------- --self-test (float64)
def self_test():
    """Ω's meta-gradient against a brute-force central difference through a real virtual step,
    and the two directional methods against each other; float64, a tiny θ and Ω."""
    def net(sizes):
        return [t for a, b in zip(sizes, sizes[1:])
                for t in (torch.randn(b, a, dtype=torch.float64) / math.sqrt(a),
                          torch.randn(b, dtype=torch.float64) * 0.1)]

    # A seed whose hidden pre-activations keep clear of ReLU's kink: a finite difference across
    # it is off by O(1), which says nothing about the code.
    for seed in range(100):
        torch.manual_seed(seed)
        theta = [p.requires_grad_() for p in net([3, 4, 3])]
        omega = [p.requires_grad_() for p in net([3, 3, 1])]
        x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
        if F.linear(x, theta[0], theta[1]).abs().min() > 0.05:
            break
    vx, vy = torch.randn(5, 3, dtype=torch.float64), torch.tensor([1, 0, 2, 1, 1])
    names = ["loss", "label-prob", "entropy"]
    f, vf = features_of(MLP, theta, x, y, names, 0.5, 4), features_of(MLP, theta, vx, vy, names, 0.5, 4)
    alpha, ok = 0.5, True

    def outer(om, val, normalize):  # L_val(θ'(Ω)) from scratch
        w = batch_weights(omega_raw(om, f), normalize).detach()
        g = torch.autograd.grad((per_sample_loss(MLP, theta, x, y) * w).mean(), theta)
        st = [p.detach() - gi * alpha for p, gi in zip(theta, g)]
        with torch.no_grad():
            lv = per_sample_loss(MLP, st, val[1], val[2])
            if val[0] == "clean":
                return lv.mean().item()
            wv = omega_raw(om, val[3])
            return ((lv * wv).sum() / wv.sum()).item()

    u = [torch.randn_like(p) for p in theta]
    ce, cf = directional_exact(MLP, theta, x, y, u), directional_fd(MLP, theta, x, y, u)
    err = (ce - cf).abs().max().item() / max(ce.abs().max().item(), 1.0)
    print(f"directional exact vs fd: max rel err {err:.2e}")
    ok &= err < 1e-3
    for val in (("clean", vx, vy), ("self-taught", vx, vy, vf)):
        for normalize in (False, True):
            for method in ("exact", "fd"):
                grads = omega_meta_gradient(MLP, theta, omega, x, y, f, val, alpha, normalize, method)
                worst, h = 0.0, 1e-6
                for gi, p in zip(grads, omega):
                    for j in range(p.numel()):
                        shift = torch.zeros_like(p.detach())
                        shift.view(-1)[j] = h
                        up = [q.detach() + shift if q is p else q.detach() for q in omega]
                        down = [q.detach() - shift if q is p else q.detach() for q in omega]
                        numeric = (outer(up, val, normalize) - outer(down, val, normalize)) / (2 * h)
                        tol = 1e-7 + 1e-5 * abs(numeric) if method == "exact" \
                            else 1e-4 + 1e-2 * abs(numeric)
                        worst = max(worst, abs(gi.reshape(-1)[j].item() - numeric) / tol)
                good = worst <= 1.0
                ok &= good
                print(f"Ω meta-gradient {val[0]:11} normalize={normalize!s:5} {method:5}: "
                      f"worst |err|/tol {worst:.3f} {'ok' if good else 'FAIL'}")
    with tempfile.TemporaryDirectory() as d:  # the hand-written safetensors reader and writer
        t = {"x": torch.randn(3, 5), "y": torch.arange(4), "e": torch.zeros(0, 2)}
        write_safetensors(f"{d}/t.safetensors", t)
        back = read_safetensors(f"{d}/t.safetensors")
        same = back.keys() == t.keys() and all(torch.equal(back[k], v) for k, v in t.items())
        print("safetensors round trip:", "ok" if same else "FAIL")
        ok &= same
    print("self-test", "passed" if ok else "FAILED")
    return ok


def main(argv):
    if argv[1:] == ["--self-test"]:
        return 0 if self_test() else 1
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        spec = json.load(f)
    print(json.dumps(run_spec(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
