"""How to apply a sparse delta on CPU: materialise it densely, gather with `index_add`, or `torch.sparse.mm`.

For SmolLM2-135M's linear shapes and a batch of tokens, each variant computes `x · Δᵀ` (Δ: k trainable values at
fixed flat positions of an (out, in) matrix) forward and backward to the values, and the median of `--repeat`
timings is printed in milliseconds. `qtrain.methods.sparse` uses the dense path: it wins at density ≥ 1 %.

    python benchmarks/sparse_delta.py [--tokens 512] [--threads 2] [--repeat 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(576, 1536), (1536, 576), (576, 576)]  # (in, out): up/gate, down, q/o of SmolLM2-135M
DENSITIES = [0.001, 0.01, 0.05]


def dense(x, idx, rows, cols, values, out, inp):
    delta = torch.zeros(out * inp).scatter(0, idx, values).view(out, inp)  # (out, in)
    return F.linear(x, delta)  # (N, out)


def index_add(x, idx, rows, cols, values, out, inp):
    return torch.zeros(x.shape[0], out).index_add(1, rows, x[:, cols] * values)  # (N, k) gathered, summed per row


def sparse_mm(x, idx, rows, cols, values, out, inp):
    s = torch.sparse_coo_tensor(torch.stack([rows, cols]), values, (out, inp), check_invariants=False)
    return torch.sparse.mm(s, x.T).T


def timed(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{'in':>5} {'out':>5} {'density':>8} {'dense ms':>9} {'index_add ms':>13} {'sparse.mm ms':>13}")
    for inp, out in SHAPES:
        x = torch.randn(args.tokens, inp)
        for density in DENSITIES:
            k = max(1, int(density * inp * out))
            idx = torch.randperm(inp * out)[:k].sort().values
            rows, cols = idx // inp, idx % inp
            values = torch.randn(k, requires_grad=True)
            res = []
            for fn in (dense, index_add, sparse_mm):
                res.append(timed(lambda: fn(x, idx, rows, cols, values, out, inp).sum().backward(), args.repeat))
            print(f"{inp:>5} {out:>5} {density:>8} {res[0]:>9.1f} {res[1]:>13.1f} {res[2]:>13.1f}")


if __name__ == "__main__":
    main()
