"""Imports run one way, down the path of a batch (docs/architecture.md): a module imports only from its own
layer and the layers before it, never from a later one (checked on every import in src/, lazy ones too)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mtrank"
LAYERS = [
    "config",
    "data",
    "nn",
    "model",
    "stats",
    "evaluate",
    "artifacts",
    "train",
    "pipeline",
    "tune",
    "export",
    "blend",
    "serve",
    "experiments",
    "cli",
]


def layer(module: str) -> int | None:
    """Layer index of ``mtrank.x.y`` (None for the package itself)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "mtrank" else None


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtrank"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("mtrank")]
    return found


def test_every_module_belongs_to_a_layer():
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        if name != "mtrank.__init__":
            assert layer(name) is not None, f"{name} is in no layer of {LAYERS}"


def test_no_module_imports_from_a_later_layer():
    violations = []
    for path in sorted(SRC.rglob("*.py")):
        name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
        if name == "mtrank.__init__":  # the package re-exports the public API
            continue
        own = layer(name)
        for module in imports(path):
            target = layer(module)
            if target is not None and target > own:
                violations.append(f"{name} ({LAYERS[own]}) imports {module} ({LAYERS[target]})")
    assert not violations, "\n".join(violations)
