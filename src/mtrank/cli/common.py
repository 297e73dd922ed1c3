"""Options shared by several commands, declared once: threads, progress bars, device, config overrides; the
shape of a command (:func:`add_command`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import yaml


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


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    func: Callable[[argparse.Namespace], int] | None,
    help: str,
    description: str | None = None,
    example: str | None = None,
) -> argparse.ArgumentParser:
    """Add the command ``name`` (``help`` in the list of commands, ``description`` in its own ``--help``,
    default ``help``, shown as written; ``example``: a command line shown last) that runs ``func(args)``;
    ``func=None`` for a group whose subcommands run."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        epilog=f"example:\n  {example}" if example else None,
        formatter_class=argparse.RawDescriptionHelpFormatter if example else argparse.HelpFormatter,
    )
    if func is not None:
        parser.set_defaults(func=func)
    return parser


@contextlib.contextmanager
def one_line_warnings(command: str) -> Iterator[None]:
    """Inside: mtrank's data warnings (:class:`~mtrank.data.errors.DataWarning`) print as one line,
    ``mtrank COMMAND: warning: ...``, on stderr; other warnings as Python prints them."""
    from mtrank.data.errors import DataWarning

    with warnings.catch_warnings():
        show = warnings.showwarning

        def show_one_line(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, DataWarning):
                print(f"mtrank {command}: warning: {message}", file=sys.stderr)
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_one_line
        yield
