"""The portable step on CUDAExecutionProvider, wherever onnxruntime has it (onnxruntime-gpu on a CUDA machine, a
Jetson's onnxruntime build): it trains like the CPU, with the state kept in GPU memory between steps."""

import numpy as np
import pytest
from test_engines import fixed_batch

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import open_engine
from edgeadapt.runtime.ort import available_providers

pytestmark = pytest.mark.skipif("CUDAExecutionProvider" not in available_providers(),
                                reason="no CUDAExecutionProvider in this onnxruntime (no GPU build or no GPU)")


@pytest.mark.parametrize("preset", ["head", "full"])
def test_portable_step_on_cuda_matches_cpu(bundle_factory, preset):
    bundle = Bundle.open(bundle_factory("tiny_cnn", preset))
    x, y = fixed_batch(bundle)
    runs = {}
    for device in ("cpu", "cuda"):
        engine = open_engine(bundle, bundle.graphs(), "onnxruntime", device)
        engine.load(bundle.load_state())
        losses = [engine.train_step(x, y, 1e-3)[0] for _ in range(10)]
        runs[device] = (np.array(losses), engine.state().params)
    assert np.allclose(runs["cuda"][0], runs["cpu"][0], rtol=1e-3)
    assert np.linalg.norm(runs["cuda"][1] - runs["cpu"][1]) / np.linalg.norm(runs["cpu"][1]) < 1e-3
