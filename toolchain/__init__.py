"""Host side of edgeadapt: builds a backbone + head (torch, or an ONNX file) and exports bundles: a portable
standard-ONNX training step, forward graph, state and a hashed manifest.

Public API: `edgeadapt.toolchain.export.export_bundle(ExportOptions(...))` and `edgeadapt.toolchain.inspect`.
"""
