"""Micro-benchmarks behind the CPU speed changes (forward + backward, microseconds per CPU-second, 1 thread).

    .venv/bin/python benchmarks/micro_ops.py

Each line times the old formulation against the one mtrank uses now, at W1 and W2 shapes.
"""

from __future__ import annotations

import time

import torch


def cpu_us(fn, calls: int) -> float:
    for _ in range(2):
        fn()
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls * 1e6


def softmax_case(batch: int) -> tuple[float, float]:
    x = torch.randn(batch, 2, 8, requires_grad=True)

    def library():
        torch.softmax(x, -1).sum().backward()

    def written_out():
        z = (x - x.detach().amax(-1, keepdim=True)).exp()
        (z / z.sum(-1, keepdim=True)).sum().backward()

    return cpu_us(library, 50), cpu_us(written_out, 50)


def mixing_case(batch: int, width: int, dtype: torch.dtype) -> tuple[float, float]:
    gates = torch.randn(batch, 2, 8).softmax(-1).requires_grad_()
    experts = torch.randn(8, batch, width, dtype=dtype, requires_grad=True)

    def einsum():
        torch.einsum("bke,ebd->kbd", gates.to(dtype), experts).float().sum().backward()

    def per_task():
        w = gates.to(dtype).permute(1, 2, 0).unsqueeze(-1)
        torch.stack([(w[k] * experts).sum(0) for k in range(2)]).float().sum().backward()

    calls = 50 if batch <= 1024 else 5
    return cpu_us(einsum, calls), cpu_us(per_task, calls)


def expert_bank_case(bf16: bool) -> tuple[float, float]:
    batch, dim, groups, h1, h2 = 4096, 429, 8, 256, 128
    x = torch.randn(batch, dim, requires_grad=True)
    w1 = torch.randn(groups, dim, h1, requires_grad=True)
    b1 = torch.randn(groups, 1, h1, requires_grad=True)
    w2 = torch.randn(groups, h1, h2, requires_grad=True)
    b2 = torch.randn(groups, 1, h2, requires_grad=True)

    def old():
        y = (x @ w1.permute(1, 0, 2).reshape(dim, -1)).view(batch, groups, h1).transpose(0, 1) + b1
        return torch.relu(torch.baddbmm(b2, torch.relu(y), w2))

    def new():
        y = (x @ w1.permute(1, 0, 2).reshape(dim, -1)).view(batch, groups, h1).transpose(0, 1).contiguous()
        h = torch.relu(y + b1.to(y.dtype))
        return torch.relu(torch.baddbmm(b2.to(h.dtype), h, w2))

    def run(fn):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = fn()
            out.float().sum().backward()

        return step

    return cpu_us(run(old), 3), cpu_us(run(new), 3)


def gather_case() -> tuple[float, float]:
    data = torch.randn(200_000, 100)
    index = torch.randperm(200_000)[:1024]
    return cpu_us(lambda: data[index], 200), cpu_us(lambda: data.index_select(0, index), 200)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = [
        ("gate softmax, W1 [1024, 2, 8]: torch.softmax vs written out", softmax_case(1024)),
        ("gate softmax, W2 [4096, 2, 8]: torch.softmax vs written out", softmax_case(4096)),
        ("mixing W1 fp32 (D=16): einsum vs per-task multiply+sum", mixing_case(1024, 16, torch.float32)),
        ("mixing W2 fp32 (D=128): einsum vs per-task multiply+sum", mixing_case(4096, 128, torch.float32)),
        ("mixing W2 bf16 (D=128): einsum vs per-task multiply+sum", mixing_case(4096, 128, torch.bfloat16)),
        ("W2 expert bank fp32: transposed + fp32 bias vs contiguous", expert_bank_case(False)),
        ("W2 expert bank bf16: transposed + fp32 bias vs contiguous + bf16 bias", expert_bank_case(True)),
        ("batch gather [1024 of 200k, 100]: t[index] vs index_select", gather_case()),
    ]
    print(f"{'case (forward + backward; gather: forward)':<72} {'old us':>10} {'new us':>10} {'old/new':>8}")
    for name, (old, new) in rows:
        print(f"{name:<72} {old:>10,.0f} {new:>10,.0f} {old / new:>8.2f}")


if __name__ == "__main__":
    main()
