"""The ``mtrank`` command line: one module per command group, each with a ``register(subparsers)``.

=============  ===========================================================================
``run``        the main job (:mod:`mtrank.cli.run`)
``reproduce``  the MMoE paper's experiments (:mod:`mtrank.cli.reproduce`)
``train``      train / evaluate / predict from a YAML experiment config (:mod:`mtrank.cli.train`)
``tune``       hyper-parameter search on the validation split (:mod:`mtrank.cli.tune`)
``export``     TorchScript / ONNX files (:mod:`mtrank.cli.export`)
``serve``      the HTTP scoring service (:mod:`mtrank.cli.serve`)
``blend``      blend tuning and the learned blend (:mod:`mtrank.cli.blend`)
``model``      verify a model directory against its manifest, or seal one (:mod:`mtrank.cli.model`)
``study``      the production studies of issue 12 (:mod:`mtrank.cli.study`)
``diagnose``   task conflict and gate statistics of a model on labelled data (:mod:`mtrank.cli.diagnose`)
``compare``    balancing methods vs fixed weights, multi-task vs single-task (:mod:`mtrank.cli.compare`)
=============  ===========================================================================

Options shared by several commands (``--threads``, ``--no-progress``, ``--device``, ``--set``) come from
:mod:`mtrank.cli.common`. Errors a user can fix (bad config values, missing files) print one line and exit 1.
"""

from __future__ import annotations

import argparse
import sys

from mtrank import __version__

COMMAND_GROUPS = (
    "run",
    "reproduce",
    "train",
    "tune",
    "export",
    "serve",
    "blend",
    "model",
    "study",
    "diagnose",
    "compare",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="mtrank",
        description="Multi-task ranking with Multi-gate Mixture-of-Experts: train, compare, analyse, export, serve.",
    )
    parser.add_argument("--version", action="version", version=f"mtrank {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        importlib.import_module(f"mtrank.cli.{group}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from mtrank.cli.common import one_line_warnings
    from mtrank.train.distributed import init_from_env, shutdown

    distributed = init_from_env()  # under torchrun: join the process group, so trainers train data-parallel
    try:
        with one_line_warnings(args.command):
            code = int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"mtrank {args.command}: error: {err}", file=sys.stderr)
        return 1
    if distributed:
        shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
