"""Small modules, one idea each, taking explicit arguments: stacked layers, embeddings, the feature mixer, the
bias tower, expert types and gate types (registries), routing, and the multi-task block."""

from mtrank.nn.block import ExtractionLevel, MultiTaskBlock
from mtrank.nn.embedding import FeatureEmbedding
from mtrank.nn.experts import DCNExpertConfig, DCNExperts, MLPExperts
from mtrank.nn.gates import SoftmaxGates, TopKGateConfig, TopKGates, load_balance_loss
from mtrank.nn.routing import expert_layout
from mtrank.nn.stacked import MLP, StackedLinear, StackedMLP

__all__ = [
    "DCNExpertConfig",
    "DCNExperts",
    "ExtractionLevel",
    "FeatureEmbedding",
    "MLP",
    "MLPExperts",
    "MultiTaskBlock",
    "SoftmaxGates",
    "StackedLinear",
    "StackedMLP",
    "TopKGateConfig",
    "TopKGates",
    "expert_layout",
    "load_balance_loss",
]
