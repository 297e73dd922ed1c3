import subprocess
import sys

BLOCK_OPTIONAL = """
import builtins
real = builtins.__import__
def guarded(name, *args, **kwargs):
    if name.split('.')[0] in ('fastapi', 'uvicorn', 'onnxruntime', 'optuna', 'prometheus_client'):
        raise ImportError('optional dependency ' + name + ' is not installed')
    return real(name, *args, **kwargs)
builtins.__import__ = guarded
from mtrank.cli import main
raise SystemExit(main(['reproduce', '--help']))
"""


def test_cli_works_without_the_serving_extras():
    """Training and reproduction commands must not need FastAPI / onnxruntime (e.g. on a GPU training box)."""
    result = subprocess.run([sys.executable, "-c", BLOCK_OPTIONAL], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "census" in result.stdout


def test_every_subcommand_has_help():
    from mtrank.cli import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"run", "reproduce", "train", "evaluate", "predict", "export", "serve"} <= set(commands)
    for name, sub in commands.items():
        assert sub.format_help().strip(), name
