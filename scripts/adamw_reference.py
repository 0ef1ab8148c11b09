#!/usr/bin/env python3
"""Reference numbers for the worker's AdamW and gradient clipping (worker/src/inner.rs, test
`adamw_and_clipping_match_torch`): a few steps of torch.optim.AdamW (foreach=False) after
torch.nn.utils.clip_grad_norm_ (foreach=False) on a tiny float32 tanh MLP 3 → 4 → 2, with the
learning rate changed before every step as a schedule would. Prints the final parameters, which
the test hard-codes.

    PYTHONPATH=$HOME/.cache/metaloop/torch-2.11.0 python3 scripts/adamw_reference.py

Inputs are exact small fractions both sides compute the same way:
parameter k (in order W1 [4,3], b1 [4], W2 [2,4], b2 [2]) element i is ((7i + 3k) mod 11 − 5)/10;
x[r, c] = ((5r + 3c) mod 7 − 3)/4 for 6 rows; y[r] = r mod 2; loss = Σ_r cross-entropy.
"""

import torch

SHAPES = [(4, 3), (4,), (2, 4), (2,)]
LRS = [0.0, 0.05, 0.1, 0.075, 0.05]
BETAS, EPS, WD, CLIP = (0.9, 0.999), 1e-8, 0.1, 0.5


def param(k, shape):
    n = 1
    for d in shape:
        n *= d
    return torch.tensor([((7 * i + 3 * k) % 11 - 5) / 10 for i in range(n)], dtype=torch.float32).reshape(shape)


def main():
    params = [torch.nn.Parameter(param(k, s)) for k, s in enumerate(SHAPES)]
    x = torch.tensor([[((5 * r + 3 * c) % 7 - 3) / 4 for c in range(3)] for r in range(6)], dtype=torch.float32)
    y = torch.tensor([r % 2 for r in range(6)])
    opt = torch.optim.AdamW(params, lr=LRS[0], betas=BETAS, eps=EPS, weight_decay=WD, foreach=False)
    for lr in LRS:
        opt.zero_grad(set_to_none=True)
        w1, b1, w2, b2 = params
        logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2
        loss = torch.nn.functional.cross_entropy(logits, y, reduction="none").sum()
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=False)
        print(f"# lr {lr}: loss {loss.item()!r}, gradient norm before clipping {norm.item()!r}")
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
    print("torch", torch.__version__)
    for p in params:
        print(", ".join(repr(v) for v in p.detach().reshape(-1).tolist()) + ",")


if __name__ == "__main__":
    main()
