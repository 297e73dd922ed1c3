"""Small modules, one idea each: embeddings, stacked experts, gates, the multi-task block."""

from mtrank.nn.embedding import FeatureEmbedding
from mtrank.nn.experts import MLP, StackedLinear, StackedMLP
from mtrank.nn.gates import TaskGates
from mtrank.nn.multitask import MultiTaskBlock, expert_layout

__all__ = [
    "FeatureEmbedding",
    "MLP",
    "StackedLinear",
    "StackedMLP",
    "TaskGates",
    "MultiTaskBlock",
    "expert_layout",
]
