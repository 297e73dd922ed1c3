"""Blending task scores into one ranking score: rules (weighted sum / product), tuning, the learned blend."""
