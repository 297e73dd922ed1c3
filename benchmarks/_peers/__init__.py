"""Adapters that train the same MMoE with mtrank, DeepCTR-Torch and torch-rechub through their public APIs."""
