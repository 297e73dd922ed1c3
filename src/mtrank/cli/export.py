"""``mtrank export``: AOTInductor / TorchScript / ONNX files of a model directory, checked against eager PyTorch."""

from __future__ import annotations

import argparse

from mtrank.cli.common import add_command


def _cmd_export(args: argparse.Namespace) -> int:
    from mtrank.export.model_dir import export_model_dir

    record = export_model_dir(args.model_dir, args.format, args.out, int8=args.int8)
    print(f"wrote {record['path']}  (max |score - eager| = {record['max_abs_diff_vs_eager']:.2e} on random inputs)")
    if args.int8:
        print(
            f"wrote {record['int8_file']} beside it  (int8: max |score - eager| = "
            f"{record['int8_max_abs_diff_vs_eager']:.2e})"
        )
    return 0


def register(subparsers) -> None:
    """Add ``mtrank export``."""
    p = add_command(
        subparsers,
        "export",
        _cmd_export,
        help="export a model directory to AOTInductor, ONNX or TorchScript, checked against eager PyTorch",
        description=(
            "Export MODEL_DIR (model.safetensors + config.json) as (dense, sparse) -> scores [B, K] with a dynamic "
            "batch size: torch.export + AOTInductor (model.pt2, needs a C++ compiler; `mtrank serve --backend aoti` "
            "loads MODEL_DIR/export/model.pt2), TorchScript (model.pt, torch.jit.load; deprecated in torch 2.13, "
            "kept as a legacy option) or ONNX (model.onnx, inputs 'dense' float32 "
            "[B, F_dense] and 'sparse' int64 [B, F_cat], output 'scores'). The export is compared with eager "
            "PyTorch on random inputs and refused if any score differs by more than 1e-5. Writes export.json."
        ),
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a model directory written by mtrank")
    p.add_argument("--format", required=True, choices=["aoti", "onnx", "torchscript"], help="export format")
    p.add_argument("--out", help="output folder (default: MODEL_DIR/export)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="with --format onnx: also write model.int8.onnx (onnxruntime int8 dynamic quantisation)",
    )
