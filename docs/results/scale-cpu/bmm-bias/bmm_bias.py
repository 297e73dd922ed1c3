"""baddbmm(bias, x, W) against bmm(x, W) then the bias added (nn.stacked.bmm_bias) on CPU: forward + backward
of a stacked layer ([G, B, in] x [G, in, out], then relu), fp32 and bf16 autocast, median of 15 passes each,
the two forms in turn.

    python docs/results/scale-cpu/bmm-bias/bmm_bias.py   # one torch thread
"""

import time

import torch

torch.set_num_threads(1)
G, B, IN, OUT = 8, 4096, 256, 128
x = torch.randn(G, B, IN, requires_grad=True)
w = torch.randn(G, IN, OUT, requires_grad=True)
b = torch.randn(G, 1, OUT, requires_grad=True)


def fused() -> torch.Tensor:
    return torch.baddbmm(b, x, w)


def split() -> torch.Tensor:
    y = torch.bmm(x, w)
    return y + b.to(y.dtype)


for dtype in (torch.float32, torch.bfloat16):
    times: dict[str, list[float]] = {"baddbmm": [], "bmm+add": []}
    for _ in range(15):
        for name, f in (("baddbmm", fused), ("bmm+add", split)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                start = time.perf_counter()
                torch.relu(f()).sum().backward()
                times[name].append(time.perf_counter() - start)
    medians = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
    print(f"{str(dtype):>15}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in medians.items()))
