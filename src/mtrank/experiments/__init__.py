"""Experiments: the main synthetic study and the paper reproductions, each a function the CLI calls."""
