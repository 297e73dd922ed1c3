"""Export: TorchScript and ONNX files checked against eager PyTorch, and reduced-precision inference models.

==================  ==========================================================================================
``common``          the exported module, random example inputs, the difference to eager PyTorch
``aoti``            torch.export + AOTInductor, a compiled ``.pt2`` package (the compiled path)
``torchscript``     ``torch.jit.trace`` + ``freeze`` (legacy: TorchScript is deprecated in torch 2.13)
``onnx``            ONNX export, int8 dynamic quantisation, :class:`~mtrank.export.onnx.OnnxScorer` (onnxruntime)
``model_dir``       ``mtrank export``: a model directory's export, checked, with ``export.json``
``precision``       bf16 / mixed / fp16 / int8 copies of a model for PyTorch inference
==================  ==========================================================================================
"""
