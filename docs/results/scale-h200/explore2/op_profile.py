"""Which host op launches W3's big kernels: the compiled step run eagerly (no CUDA graph, so the profiler sees
each op), two steps profiled with input shapes, ops sorted by their device time.

    PYTHONPATH=src python3 docs/results/scale-h200/explore2/op_profile.py 65536   # from the repo root, on a GPU
"""

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
import w3  # noqa: E402
from mtrank.model import MultiTaskModel  # noqa: E402
from mtrank.train import Trainer  # noqa: E402

p = argparse.Namespace(
    quick=False,
    table_scale=20,
    embedding_dim=128,
    experts=2,
    cross_rank=256,
    pad_to=64,
    optimizer="adam",
    sparse="rowwise_adagrad",
    sparse_lr=0.0,
    precision="bf16",
    device="cuda",
    compile=True,
    lr=1e-3,
)
spec = w3.w3_spec(p)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
data = spec.data(4 * B, 1)
torch.manual_seed(0)
cfg = w3.train_config(p, B, 1e-3, steps=3)
trainer = Trainer(MultiTaskModel(spec.model, seed=0), cfg, cuda_graphs=False)
data = data.to(trainer.device)
trainer.fit(data)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
    trainer.config.steps = 2
    trainer.fit(data)
    torch.cuda.synchronize()
print(
    prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=40, max_shapes_column_width=70
    )
)
