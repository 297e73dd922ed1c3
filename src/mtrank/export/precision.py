"""Reduced-precision inference in PyTorch: bf16 (CPU and GPU), fp16 (GPU), int8 dynamic quantisation (CPU).

* ``bf16`` / ``fp16``: the weights are cast once; the gates still take their softmax in float32 (see
  :mod:`mtrank.nn.gates`) and the scores come back as float32.
* ``mixed``: only the expert bank (most of the FLOPs) runs in bf16, with float32 accumulation; embeddings,
  gates and towers stay float32. The first expert layer's input is split into two bf16 terms,
  ``x = x_hi + x_lo`` (``x_hi = bf16(x)``, ``x_lo = bf16(x - x_hi)``), both multiplied in one GEMM (rows
  stacked), so the input's rounding error (the larger one, measured in docs/serving.md) cancels and only the
  weights' bf16 rounding remains, at twice that layer's bf16 cost.
* ``int8``: dynamic quantisation, weights int8 per output channel, activations quantised per batch at run
  time, int32 accumulation (fbgemm). ``torch.ao.quantization.quantize_dynamic`` only knows ``nn.Linear``, and
  the experts are :class:`~mtrank.nn.StackedLinear` ``[G, in, out]`` weights, so :class:`Int8StackedLinear`
  rewrites each one as ``nn.Linear`` layers first: the expert bank's first layer as ONE linear
  ``[in] -> [G*out]`` (every expert reads the same input; this layer holds most of the FLOPs), later layers as
  G linears. Gates and towers stay float32: they are a few percent of the compute and the gates decide the
  expert mix.

Measured latency and score / AUC changes: ``benchmarks/serving.py`` -> ``docs/serving.md``.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from mtrank.model import MultiTaskModel
from mtrank.nn import StackedLinear

PRECISIONS = ("fp32", "bf16", "mixed", "fp16", "int8")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Int8StackedLinear(nn.Module):
    """A :class:`StackedLinear` computed with int8 dynamic-quantised ``nn.Linear`` layers.

    ``y[g] = x[g] @ W[g] + b[g]``; shapes as :class:`StackedLinear`:
    ``[B, in]`` or ``[G, B, in]`` -> ``[G, B, out]``.

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
            linear.weight.data = weight.permute(0, 2, 1).reshape(-1, layer.in_features).contiguous()  # (G*out, in)
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
                raise ValueError(f"Int8StackedLinear(shared_input=True) expects [B, in], got {tuple(x.shape)}")
            y = self.linears[0](x).view(x.shape[0], self.groups, self.out_features)  # (B, G, out)
            return y.transpose(0, 1)  # (G, B, out)
        if x.dim() == 2:
            return torch.stack([linear(x) for linear in self.linears])  # (G, B, out)
        return torch.stack([linear(x[g]) for g, linear in enumerate(self.linears)])  # (G, B, out)


class Bf16StackedLinear(nn.Module):
    """A :class:`StackedLinear` computed in bf16 with float32 accumulation and a float32 result.

    Shapes as :class:`StackedLinear`. With ``split_input`` the input is multiplied as ``bf16(x) + bf16(x -
    bf16(x))`` (two bf16 terms stacked into one GEMM), which removes the input's rounding error.

    Args:
        layer: the float layer.
        shared_input: the layer reads one input shared by all groups (``[B, in]``): one GEMM against the
            ``[in, G*out]`` weights, laid out once here.
        split_input: split the input into high and low bf16 parts.
    """

    def __init__(self, layer: StackedLinear, shared_input: bool, split_input: bool) -> None:
        super().__init__()
        self.groups, self.out_features = layer.groups, layer.out_features
        self.shared_input, self.split_input = shared_input, split_input
        weight = layer.weight.detach().float()  # (G, in, out)
        if shared_input:
            weight = weight.permute(1, 0, 2).reshape(layer.in_features, -1)  # (in, G*out)
        self.register_buffer("weight", weight.contiguous().to(torch.bfloat16))
        self.register_buffer("bias", layer.bias.detach().float().clone())  # (G, 1, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_dim = 0 if x.dim() == 2 else 1
        high = x.to(torch.bfloat16)
        if self.split_input:
            low = (x.float() - high.float()).to(torch.bfloat16)
            stacked = torch.cat([high, low], dim=batch_dim)  # (2B, in) or (G, 2B, in)
            y = self._matmul(stacked).float()
            y = y.narrow(batch_dim, 0, x.shape[batch_dim]) + y.narrow(batch_dim, x.shape[batch_dim], x.shape[batch_dim])
        else:
            y = self._matmul(high).float()
        if self.shared_input:
            y = y.view(x.shape[0], self.groups, self.out_features).transpose(0, 1)  # (G, B, out)
        return y + self.bias

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared_input:
            return x @ self.weight  # (B, G*out)
        if x.dim() == 2:
            return torch.matmul(x.unsqueeze(0), self.weight)  # (G, B, out)
        return torch.bmm(x, self.weight)  # (G, B, out)


def mixed_precision(model: MultiTaskModel, device: str | torch.device = "cpu") -> MultiTaskModel:
    """A copy of ``model`` whose expert bank runs in bf16 (first layer with split input), the rest float32."""
    mixed = copy.deepcopy(model).float().to(device).eval()
    for layers, first_shared in mixed.expert_banks():
        for i, layer in enumerate(layers):
            shared = first_shared and i == 0
            layers[i] = Bf16StackedLinear(layer, shared_input=shared, split_input=i == 0)
    return mixed


def quantize_int8(model: MultiTaskModel) -> MultiTaskModel:
    """A copy of ``model`` with int8 dynamic-quantised experts and shared hidden layer (CPU only)."""
    qmodel = copy.deepcopy(model).float().cpu().eval()
    for layers, first_shared in qmodel.expert_banks():
        for i, layer in enumerate(layers):
            layers[i] = Int8StackedLinear(layer, shared_input=first_shared and i == 0)
    shared = qmodel.shared_hidden_layer()
    if shared is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(
                shared, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
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
    """A copy of ``model`` in evaluation mode, on ``device``, with weights in ``precision`` (the original is
    left as it is).

    Example:
        >>> from mtrank import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 4}))
        >>> inference_model(model, "bf16").dtype, inference_model(model, "mixed").dtype, model.dtype
        (torch.bfloat16, torch.float32, torch.float32)
    """
    check_precision(precision, device)
    if precision == "int8":
        return quantize_int8(model)
    if precision == "mixed":
        return mixed_precision(model, device)
    return copy.deepcopy(model).to(device=device, dtype=DTYPES[precision]).eval()


class PrecisionScoring(nn.Module):
    """``(dense float32 [B, F_dense], sparse int64 [B, F_cat]) -> scores float32 [B, K]`` for a model of any
    precision (:func:`inference_model`).

    The dense input is cast to the model's dtype; the scores are cast back to float32.

    Example:
        >>> from mtrank import ModelConfig
        >>> model = MultiTaskModel(ModelConfig(inputs={"num_dense": 4}))
        >>> scores = PrecisionScoring(inference_model(model, "bf16"))(torch.randn(3, 4), torch.zeros(3, 0).long())
        >>> scores.shape, scores.dtype
        (torch.Size([3, 2]), torch.float32)
    """

    def __init__(self, model: MultiTaskModel) -> None:
        super().__init__()
        self.model = model
        self.dtype = model.dtype

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        logits = self.model(dense.to(self.dtype), sparse).task_logits.float()
        return self.model.scores(logits)
