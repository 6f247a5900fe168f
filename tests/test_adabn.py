"""AdaBN: BN statistics re-estimated on the device, checked against PyTorch's train-mode pass; only statistics
change; train and eval graphs agree with them; resume stays bit-exact; split bundles recompute their prefix
features; deploy bakes them in; the legacy engine refuses them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgeadapt.runtime.adabn import adapt_bn
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import load_unlabeled, preprocess
from edgeadapt.runtime.engines import open_engine
from edgeadapt.runtime.errors import BackendError
from edgeadapt.runtime.state import named_parameters
from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.export import ExportOptions, build

BATCH = 50


def _state(path):
    bundle = Bundle.open(path)
    return bundle, bundle.load_state()


def _torch_model(bundle: Bundle, state) -> torch.nn.Module:
    """The bundle's network in PyTorch, with the bundle's parameters and statistics."""
    model = build(ExportOptions(out=None, backbone="tiny_cnn", head=HeadRequest(labels=bundle.manifest.labels),
                                trainable="full", input_size=(32,))).module
    values = {**named_parameters(state.params, bundle.manifest.portable.layout),
              **named_parameters(state.statistics, bundle.manifest.portable.statistics)}
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in values.items()}, strict=False)
    return model


def test_adapt_bn_is_pytorchs_train_mode_pass_and_changes_only_statistics(fresh_bundle, digit_image_npz):
    path = fresh_bundle("tiny_cnn", "full")
    files_before = {f.name: f.read_bytes() for f in path.iterdir() if f.is_file() and f.name != "state.safetensors"}
    bundle, before = _state(path)
    result = adapt_bn(path, digit_image_npz, batch_size=BATCH)
    _, after = _state(path)
    assert result.samples == 300 and result.batches == 6 and result.statistics == 8
    assert np.array_equal(after.params, before.params)  # weights untouched, bit for bit
    assert {f.name: f.read_bytes() for f in path.iterdir() if f.is_file() and f.name != "state.safetensors"} \
        == files_before
    # PyTorch: train mode, cumulative average (momentum None) over the same batches
    model = _torch_model(bundle, before)
    data = load_unlabeled(digit_image_npz, bundle.manifest)
    x = torch.from_numpy(preprocess(data.samples, bundle.manifest, True))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for start in range(0, len(x), BATCH):
            model(x[start:start + BATCH])
    expected = np.concatenate([np.concatenate([n.running_mean.numpy(), n.running_var.numpy()]) for n in norms])
    np.testing.assert_allclose(after.statistics, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(after.statistics, before.statistics)
    # eval == train graph with the new statistics, and both == PyTorch's eval mode with them
    engine = open_engine(bundle, bundle.graphs(), "onnxruntime")
    engine.load(after)
    batch = preprocess(data.samples[:16], bundle.manifest, True)
    _, step_logits = engine.train_step(batch, np.zeros(16, np.int64), 0.0)
    forward_logits = engine.logits(batch)
    reference = _torch_model(bundle, after).eval()(torch.from_numpy(batch)).detach().numpy()
    np.testing.assert_allclose(step_logits, forward_logits, atol=1e-5)
    np.testing.assert_allclose(forward_logits, reference, atol=1e-4)


def _train(bundle, data, kill_at_step=None, resume=False):
    code = f"""
import os, signal, sys
sys.modules['torch'] = None
from edgeadapt.runtime.trainer import Trainer, TrainConfig
def on_batch(step, total, loss, acc):
    if step == {kill_at_step!r}:
        os.kill(os.getpid(), signal.SIGKILL)
config = TrainConfig(epochs=3, batch_size=32, lr=3e-3, seed=1, checkpoint_every=3, resume={resume}, adabn="all")
Trainer({str(bundle)!r}, config, on_batch=on_batch).fit({str(data)!r})
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_train_with_adabn_resumes_bit_exactly(fresh_bundle, bundle_factory, digit_image_npz, tmp_path):
    path = fresh_bundle("tiny_cnn", "full")
    reference = shutil.copytree(path, tmp_path / "reference")
    assert _train(reference, digit_image_npz).returncode == 0
    assert _train(path, digit_image_npz, kill_at_step=11).returncode != 0
    resumed = _train(path, digit_image_npz, resume=True)
    assert resumed.returncode == 0, resumed.stderr
    (_, expected), (_, actual) = _state(reference), _state(path)
    assert np.array_equal(expected.params, actual.params)
    assert np.array_equal(expected.statistics, actual.statistics)
    _, exported = _state(bundle_factory("tiny_cnn", "full"))
    assert not np.array_equal(actual.statistics, exported.statistics)  # AdaBN ran, once, before training


def test_split_bundle_recomputes_prefix_features_and_deploy_bakes_statistics(bundle_factory, digit_image_npz,
                                                                            tmp_path):
    from edgeadapt.runtime import training_target as targets
    from edgeadapt.runtime.data import load_dataset
    from edgeadapt.runtime.deploy import deploy
    from edgeadapt.runtime.inference import evaluate
    from edgeadapt.runtime.trainer import TrainConfig

    path = shutil.copytree(bundle_factory("tiny_cnn", "last:2"), tmp_path / "b")
    bundle = Bundle.open(path)
    assert bundle.manifest.split is not None and bundle.manifest.split.prefix_statistics
    data = load_dataset(digit_image_npz, bundle.manifest)
    config = TrainConfig().for_bundle(bundle.manifest)
    before, _, _ = targets.prepare(bundle, config, data, None)
    adapt_bn(path, digit_image_npz, scope="prefix", batch_size=BATCH)
    _, state = _state(path)
    _, exported = _state(bundle_factory("tiny_cnn", "last:2"))
    prefix_only = {p.name for p in bundle.manifest.portable.statistics} - set(bundle.manifest.split.prefix_statistics)
    for p in bundle.manifest.portable.statistics:  # scope prefix: the suffix's statistics are the exported ones
        same = np.array_equal(state.statistics[p.offset:p.offset + p.size], exported.statistics[p.offset:p.offset
                                                                                                 + p.size])
        assert same == (p.name in prefix_only)
    after, _, _ = targets.prepare(bundle, config, data, None)
    assert not np.allclose(before.samples, after.samples)  # the cache did not serve stale prefix features
    assert len(list((path / "feature_cache").iterdir())) == 1  # the stale namespace was dropped
    # split evaluation (suffix on cached features) == whole graph == the deployed model
    whole = evaluate(path, data)
    model = deploy(bundle, "onnx", tmp_path / "model.onnx").path
    import onnxruntime

    x = preprocess(data.samples, bundle.manifest, True)
    deployed = onnxruntime.InferenceSession(str(model)).run(None, {"input": x})[0]
    assert np.mean(deployed.argmax(1) == data.targets) == pytest.approx(whole.accuracy)
    suffix = open_engine(bundle, bundle.graphs(split=True), "onnxruntime", training=False)
    suffix.load(state)
    np.testing.assert_allclose(suffix.logits(after.samples.astype(np.float32)), deployed, atol=1e-4)


@pytest.mark.ort_training
def test_ort_training_engine_refuses_reestimated_statistics(fresh_bundle, digit_image_npz):
    from conftest import run_cli

    path = fresh_bundle("tiny_cnn", "full", backbone_lr_ratio=1.0, decay_norms=True)  # one group, as ORT trains
    assert "4 BN layers; as exported" in run_cli("inspect", path).stdout
    result = run_cli("adapt-bn", path, digit_image_npz, "--batch-size", BATCH, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["statistics"] == 8
    assert "re-estimated (adapt-bn)" in run_cli("inspect", path).stdout
    bundle, state = _state(path)
    with pytest.raises(BackendError, match="adapt-bn"):
        open_engine(bundle, bundle.graphs(), "ort-training").load(state)


def test_the_stages_find_folded_batchnorms_by_the_folds_record_not_by_names():
    """Every tensor of the fold renamed: AdaBN's statistics layout, the statistics graph and the step's gradient
    rule for folded weights still find each BN, since they read the fold's record (renaming a prefix used to
    disable AdaBN silently)."""
    from edgeadapt.toolchain.bn import FOLD_RECORD, folded_batchnorms, folded_weights, statistics_layout
    from edgeadapt.toolchain.export import make_source
    from edgeadapt.toolchain.train_step import build_train_step

    source = make_source(ExportOptions(out=None, backbone="tiny_cnn", head=HeadRequest(num_classes=3),
                                       input_size=(16,), trainable="full"))
    graph, expected = source.graph, statistics_layout(source.graph)
    assert len(folded_batchnorms(graph)) == 4 and folded_weights(graph)

    def renamed(name: str) -> str:
        return name.replace("bnfold/", "folded-bn:") if name else name
    for node in graph.graph.node:
        node.input[:] = [renamed(n) for n in node.input]
        node.output[:] = [renamed(n) for n in node.output]
    for init in graph.graph.initializer:
        init.name = renamed(init.name)
    for entry in graph.metadata_props:
        if entry.key == FOLD_RECORD:
            entry.value = entry.value.replace("bnfold/", "folded-bn:")
    assert not any("bnfold/" in n for node in graph.graph.node for n in node.output)
    assert [p.name for p in statistics_layout(graph)] == [p.name for p in expected]
    assert len(folded_weights(graph)) == 4  # tiny_cnn: every conv's BN folds into it
    step = build_train_step(graph, source.params, "cross_entropy", "adamw", statistics=statistics_layout(graph)).step
    assert "bn_stats" in {i.name for i in step.graph.input}
