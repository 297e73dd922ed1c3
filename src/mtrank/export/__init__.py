"""Export: TorchScript and ONNX files checked against eager PyTorch, and reduced-precision inference models."""
