"""Small modules, one idea each, taking explicit arguments: stacked layers, embeddings, the feature mixer, the
bias tower, expert types and gate types (registries), routing, residuals, PEPNet's gates and the multi-task
block."""

from mtrank.nn.block import ExtractionLevel, MultiTaskBlock
from mtrank.nn.dselect_k import DSelectKGateConfig, DSelectKGates
from mtrank.nn.embedding import FeatureEmbedding
from mtrank.nn.experts import DCNExpertConfig, DCNExperts, HoMEExpertConfig, HoMEExperts, MLPExperts
from mtrank.nn.gates import SoftmaxGates, TopKGateConfig, TopKGates, load_balance_loss
from mtrank.nn.routing import LevelLayout, block_layouts
from mtrank.nn.stacked import MLP, StackedLinear, StackedMLP, StackedNorm

__all__ = [
    "DCNExpertConfig",
    "DCNExperts",
    "DSelectKGateConfig",
    "DSelectKGates",
    "ExtractionLevel",
    "FeatureEmbedding",
    "HoMEExpertConfig",
    "HoMEExperts",
    "LevelLayout",
    "MLP",
    "MLPExperts",
    "MultiTaskBlock",
    "SoftmaxGates",
    "StackedLinear",
    "StackedMLP",
    "StackedNorm",
    "TopKGateConfig",
    "TopKGates",
    "block_layouts",
    "load_balance_loss",
]
