"""edgeadapt: export pretrained backbones to portable ONNX training bundles and adapt them on the device.

The package maps the repository's folders: `edgeadapt.toolchain` (toolchain/, host), `edgeadapt.runtime`
(runtime/, device), `edgeadapt.models` (models/, the zoo), `edgeadapt.devices` (devices/, profiles and benchmarks).
"""

__version__ = "0.3.0"
