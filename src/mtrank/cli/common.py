"""Options shared by several commands, declared once: threads, progress bars, device, config overrides."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import yaml


def add_command(
    subparsers, name: str, func: Callable[[argparse.Namespace], int], help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand ``name`` that runs ``func(args)``; ``help`` is its line in ``mtrank --help``."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=func)
    return parser


def add_threads(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    help_default = f"default {default}" if default else "default: PyTorch's choice"
    parser.add_argument(
        "--threads",
        type=int,
        default=default,
        help=f"CPU threads for PyTorch ({help_default}; small models train fastest on 1, and a busy machine "
        "loses least with 1)",
    )


def apply_threads(args: argparse.Namespace) -> None:
    """Set PyTorch's intra-op threads from ``--threads`` (when given)."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def add_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_device(parser: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    parser.add_argument(
        "--device", default=default, choices=["cpu", "cuda", "auto"], help=f"training device (default {default})"
    )


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=2 --set model.block.type=omoe (repeatable; the "
        "value is read as YAML)",
    )


def overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["train.epochs=2", ...]`` -> ``{"train.epochs": 2, ...}`` (values parsed as YAML)."""
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out
