"""``mtrank model verify | seal``: check a model directory against its manifest; write the manifest of one."""

from __future__ import annotations

import argparse
import json

from mtrank.cli.common import add_command


def _cmd_verify(args: argparse.Namespace) -> int:
    from mtrank.artifacts import MANIFEST_FILE, open_model_dir

    loaded = open_model_dir(args.model_dir)  # every check a load makes; one line naming the file if one fails
    manifest = loaded.path / MANIFEST_FILE
    if not manifest.is_file():
        print(f"{loaded.path}: loads, but has no {MANIFEST_FILE}: `mtrank model seal {loaded.path}` adds one")
        return 1
    written = json.loads(manifest.read_text())
    print(
        f"{loaded.path}: ok, {len(written['files'])} files match {MANIFEST_FILE} (written by mtrank "
        f"{written['mtrank_version']}, torch {written['torch_version']}); weights finite; tasks "
        f"{loaded.model.task_names}"
    )
    return 0


def _cmd_seal(args: argparse.Namespace) -> int:
    from mtrank.artifacts import (
        FORMAT_VERSION,
        MANIFEST_FILE,
        atomic_write_text,
        open_model_dir,
        read_model_meta,
        seal_model_dir,
    )

    loaded = open_model_dir(args.model_dir, verify=False)  # it must load as it is before it is trusted
    before = {}
    if (loaded.path / MANIFEST_FILE).is_file():
        before = json.loads((loaded.path / MANIFEST_FILE).read_text()).get("files", {})
    meta = read_model_meta(loaded.path, verify=False)
    if meta["format_version"] != FORMAT_VERSION:  # format 1 / 2: written as format 3, which requires the manifest
        meta["format_version"] = FORMAT_VERSION
        atomic_write_text(loaded.path / "config.json", json.dumps(meta, indent=2, sort_keys=True))
    after = json.loads(seal_model_dir(loaded.path).read_text())["files"]
    changes = [f"{n} added" for n in after if n not in before]
    changes += [f"{n} changed" for n in after if n in before and before[n] != after[n]]
    changes += [f"{n} removed" for n in before if n not in after]
    print(f"sealed {loaded.path}: {len(after)} files ({', '.join(changes) or 'no change'})")
    return 0


def register(subparsers) -> None:
    """Add ``mtrank model verify`` and ``mtrank model seal``."""
    group = add_command(
        subparsers,
        "model",
        None,
        "check a model directory against its manifest, or seal one",
        "Every file of a model directory is listed in its manifest.json with its size and SHA-256; everything\n"
        "that opens the directory (serve, evaluate, predict, export, blend) checks them (docs/reliability.md).",
    )
    commands = group.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    p = add_command(
        commands,
        "verify",
        _cmd_verify,
        "load a model directory as the service would and check every file against manifest.json",
        example="mtrank model verify runs/census",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p = add_command(
        commands,
        "seal",
        _cmd_seal,
        "write manifest.json over the files a model directory holds now",
        "Write MODEL_DIR/manifest.json: the size and SHA-256 of every file, the mtrank and torch versions. For a\n"
        "directory of format 1 or 2 (written before mtrank checked its files), or after a deliberate change\n"
        "(a hand-edited blend.json): it trusts the files as they are, so run it only on a directory you know is\n"
        "good. The directory must load first (weights finite and of the config's shapes).",
        example="mtrank model seal runs/census",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR")
