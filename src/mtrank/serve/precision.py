"""Reduced-precision inference in PyTorch: bf16 (CPU and GPU), fp16 (GPU), int8 dynamic quantisation (CPU).

* ``bf16`` / ``fp16``: the weights are cast once; the gates still take their softmax in float32 (see
  :class:`~mtrank.nn.TaskGates`) and the scores come back as float32.
* ``int8``: dynamic quantisation, weights int8 per output channel, activations quantised per batch at run time,
  int32 accumulation (fbgemm). ``torch.ao.quantization.quantize_dynamic`` only knows ``nn.Linear``, and the
  experts are :class:`~mtrank.nn.StackedLinear` ``[G, in, out]`` weights, so :class:`Int8StackedLinear` rewrites
  each one as ``nn.Linear`` layers first: the expert bank's first layer as ONE linear ``[in] -> [G*out]``
  (every expert reads the same input; this layer holds most of the FLOPs), later layers as G linears. Gates and
  towers stay float32: they are a few percent of the compute and the gates decide the expert mix.

Measured latency and score / AUC changes: ``benchmarks/serving.py`` -> ``docs/serving.md``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from mtrank.models import MultiTaskModel
from mtrank.nn import StackedLinear

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Int8StackedLinear(nn.Module):
    """A :class:`StackedLinear` computed with int8 dynamic-quantised ``nn.Linear`` layers.

    ``y[g] = x[g] @ W[g] + b[g]``; shapes as :class:`StackedLinear`: ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, out]``.

    Args:
        layer: the float layer to quantise.
        shared_input: the layer always reads one input shared by all groups (the expert bank's first layer):
            one linear ``[in] -> [G*out]`` instead of G linears.
    """

    def __init__(self, layer: StackedLinear, shared_input: bool) -> None:
        super().__init__()
        self.groups, self.out_features = layer.groups, layer.out_features
        self.shared_input = shared_input
        weight, bias = layer.weight.detach().float(), layer.bias.detach().float()  # (G, in, out), (G, 1, out)
        if shared_input:
            linear = nn.Linear(layer.in_features, layer.groups * layer.out_features)
            linear.weight.data = (
                weight.permute(0, 2, 1).reshape(-1, layer.in_features).contiguous()
            )  # (G*out, in)
            linear.bias.data = bias.reshape(-1).contiguous()  # (G*out,)
            self.linears = nn.ModuleList([linear])
        else:
            self.linears = nn.ModuleList()
            for g in range(layer.groups):
                linear = nn.Linear(layer.in_features, layer.out_features)
                linear.weight.data = weight[g].t().contiguous()  # (out, in)
                linear.bias.data = bias[g, 0].contiguous()
                self.linears.append(linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao deprecation notices
            self.linears = torch.ao.quantization.quantize_dynamic(
                self.linears,
                {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                dtype=torch.qint8,
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            if x.dim() != 2:
                raise ValueError(
                    f"Int8StackedLinear(shared_input=True) expects [B, in], got {tuple(x.shape)}"
                )
            y = self.linears[0](x).view(x.shape[0], self.groups, self.out_features)  # (B, G, out)
            return y.transpose(0, 1)  # (G, B, out)
        if x.dim() == 2:
            return torch.stack([linear(x) for linear in self.linears])  # (G, B, out)
        return torch.stack([linear(x[g]) for g, linear in enumerate(self.linears)])  # (G, B, out)


def quantize_int8(model: MultiTaskModel) -> MultiTaskModel:
    """A copy of ``model`` with int8 dynamic-quantised experts and shared hidden layer (CPU only)."""
    qmodel = copy.deepcopy(model).float().cpu().eval()
    block = qmodel.block
    experts = block.experts.layers
    for i, layer in enumerate(experts):
        experts[i] = Int8StackedLinear(layer, shared_input=(i == 0))
    if block.shared is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            block.shared = torch.ao.quantization.quantize_dynamic(
                block.shared,
                {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                dtype=torch.qint8,
            )
    return qmodel


def check_precision(precision: str, device: str | torch.device) -> None:
    """Raise ``ValueError`` naming the problem when ``precision`` cannot run on ``device``."""
    kind = torch.device(device).type
    if precision not in PRECISIONS:
        raise ValueError(f"precision: unknown {precision!r}; expected one of {PRECISIONS}")
    if precision == "fp16" and kind != "cuda":
        raise ValueError("precision: fp16 inference is for GPUs (--device cuda); on CPU use bf16 or int8")
    if precision == "int8" and kind != "cpu":
        raise ValueError("precision: int8 dynamic quantisation runs on CPU only; on GPU use fp16 or bf16")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for but no GPU is available")


def inference_model(model: MultiTaskModel, precision: str = "fp32", device: str = "cpu") -> MultiTaskModel:
    """A copy of ``model`` in evaluation mode, on ``device``, with weights in ``precision``."""
    check_precision(precision, device)
    if precision == "int8":
        return quantize_int8(model)
    return copy.deepcopy(model).to(device=device, dtype=DTYPES[precision]).eval()


class PrecisionScoring(nn.Module):
    """``(dense float32, sparse int64) -> scores [B, K] float32`` for a model of any precision.

    The dense input is cast to the model's weight dtype; the scores are cast back to float32.
    """

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model
        self.dtype = model.embedding.table.weight.dtype

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        logits = self.model(dense.to(self.dtype), sparse).task_logits.float()
        return self.model.scores(logits)
