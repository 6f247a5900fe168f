"""Host side of edgeadapt: builds a backbone + head in torch and exports ONNX Runtime training bundles.

Public API: `edgeadapt.toolchain.export.export_bundle(ExportOptions(...))` and `edgeadapt.toolchain.inspect`.
"""
