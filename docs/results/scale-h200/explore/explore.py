"""Scratch (not committed): W2/W3 at batch 65,536, pad and torch.compile variants, one table."""
import json, os, sys, time, gc
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import w3

COMPILE = {"on": False}
class CTrainer(w3.Trainer):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if COMPILE["on"]:
            self.runs.module = torch.compile(self.model, dynamic=False, mode=os.environ.get('MODE') or None)
w3.Trainer = CTrainer

out = {}
DEV = os.environ.get("DEV", "cuda"); QUICK = DEV == "cpu"
torch._dynamo.config.cache_size_limit = 64
def run(workload, batch, pad, comp, sparse="dense", steps=30):
    args = w3.main.__globals__["argparse"].Namespace(
        workload=workload, device=DEV, precision="bf16", optimizer="adam", lr=1e-3, steps=steps, warmup_steps=6,
        profile_steps=3, rows=0, table_scale=20, embedding_dim=128, experts=2, cross_rank=256, sparse=sparse,
        pad_to=pad, quick=QUICK, threads=16)
    spec = (w3.w3_spec if workload == "W3" else w3.w2_spec)(args)
    COMPILE["on"] = comp
    key = f"{workload} b{batch} pad{pad} compile={comp} sparse={sparse}"
    t = time.time()
    try:
        data = spec.data(8 * batch, 1)
        r = w3.measure(spec, args, batch, data, PEAK)
        r["wall_s"] = time.time() - t
    except Exception as e:
        r = {"error": f"{type(e).__name__}: {e}"[:800]}
        print(key, r)
    out[key] = r
    gc.collect(); torch._dynamo.reset()
    if DEV == "cuda": torch.cuda.empty_cache()
    Path(os.environ["OUT"], "explore.json").write_text(json.dumps(out, indent=1, default=str))
    print(f"== {key}: {r.get('samples_per_s', 0):,.0f}/s  wall {time.time()-t:.0f}s", flush=True)

PEAK = w3.matmul_tflops(torch.device(DEV), 8192 if DEV == "cuda" else 128, 3)
torch.set_num_threads(16)
which = sys.argv[1:]
for spec in which:
    wl, b, pad, comp, sparse = spec.split(":")
    run(wl, int(b), int(pad), comp == "1", sparse)
print()
for k, r in out.items():
    prof = r.get("profile", {}).get("families", {})
    print(f"{k:55s} {r.get('samples_per_s', 0):>12,.0f} MFU {r.get('mfu_vs_measured_bf16_matmul', 0):6.1%} "
          f"{r.get('peak_memory_gb', 0):5.1f}GB " + " ".join(f"{a}:{v:.0%}" for a, v in prof.items()) + " " + r.get("error", "")[:200])
