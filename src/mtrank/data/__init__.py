"""Data: in-memory tensor datasets, the Ma et al. synthetic generator, real-data loaders."""

from mtrank.data.synthetic import SyntheticConfig, make_synthetic
from mtrank.data.tensors import TensorData

__all__ = ["TensorData", "SyntheticConfig", "make_synthetic"]
