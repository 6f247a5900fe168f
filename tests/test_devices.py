"""Device profiles, the memory planner, fitting a batch into a profile, and `edgeadapt bench`."""

import functools
import json

import numpy as np
import pytest

from conftest import run_cli
from edgeadapt.devices.fit import batch_for_profile
from edgeadapt.devices.planner import plan_memory, planned_peak
from edgeadapt.devices.profiles import get_profile, load_profiles
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import ConfigError, UnknownNameError
from edgeadapt.toolchain.build import HeadRequest

EXPECTED_PROFILES = {"host", "raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "intel-core-ultra",
                     "snapdragon-phone", "android-midrange"}


def test_all_device_classes_have_profiles():
    assert EXPECTED_PROFILES <= set(load_profiles())


@pytest.mark.parametrize("name", sorted(EXPECTED_PROFILES))
def test_profile_is_sound(name):
    profile = get_profile(name)
    assert 1 <= profile.threads <= profile.cores
    assert profile.memory_budget_mb > 0
    assert profile.training_backend in ("cpu", "cuda")
    assert profile.inference_backends and profile.prefix_backend
    assert name == "host" or profile.sources, "figures need sources"


def test_unknown_profile():
    with pytest.raises(UnknownNameError, match="raspberry-pi-4"):
        get_profile("raspberry-pi-44")


@pytest.fixture(scope="module")
def mobilenet_bundles(bundle_factory):
    return {p: bundle_factory("mobilenet_v2", p, weights="imagenet", head=HeadRequest(num_classes=10))
            for p in ("head", "last:2", "bias", "full")}


@pytest.mark.slow
def test_planner_grows_with_batch_and_trainable_set(mobilenet_bundles):
    plans = {p: {b: plan_memory(Bundle.open(path).manifest, b) for b in (8, 32)}
             for p, path in mobilenet_bundles.items()}
    for by_batch in plans.values():
        assert by_batch[32].total_mb > by_batch[8].total_mb
    assert plans["head"][32].total_mb < plans["last:2"][32].total_mb < plans["full"][32].total_mb
    # bias keeps about the activations full keeps, but only ReLU6's gradient masks read them: priced lower
    bias, full = (Bundle.open(mobilenet_bundles[p]).manifest.memory for p in ("bias", "full"))
    assert bias["masked_bytes_per_sample"] > 0.9 * bias["kept_bytes_per_sample"]
    assert full["masked_bytes_per_sample"] < 0.05 * full["kept_bytes_per_sample"]  # weight gradients read them
    assert plans["bias"][32].activations_mb < 0.6 * plans["full"][32].activations_mb
    # the state terms from the training graph itself: its flat `params` input and one moment per optimizer input
    import onnx

    step = onnx.load(str(mobilenet_bundles["full"] / "train_step.onnx"))
    inputs = {i.name: i for i in step.graph.input}
    params = inputs["params"].type.tensor_type.shape.dim[0].dim_value
    moments = sum(name in inputs for name in ("adam_m", "adam_v"))
    full = plans["full"][32]
    assert params == 2_236_682 and moments == 2  # torchvision's MobileNetV2 with a 10-class head, AdamW
    assert full.gradients_mb == pytest.approx(2 * params * 4 / 2**20)  # the flat gradient and the new params
    assert full.optimizer_mb == pytest.approx(2 * moments * params * 4 / 2**20)  # each moment, also fresh


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["head", "bias", "full"])
def test_planner_predicts_the_measured_peak(mobilenet_bundles, preset):
    """The plan against a real training process's peak RSS (VmHWM), MobileNetV2 224 px, batch 8 and 16."""
    from edgeadapt.devices.bench import run_case

    manifest = Bundle.open(mobilenet_bundles[preset]).manifest
    for batch in (8, 16):
        measured = run_case(mobilenet_bundles[preset], batch, 2, steps=3, warmup=2, inference=False)["peak_rss_mb"]
        planned = plan_memory(manifest, batch).total_mb
        assert abs(planned - measured) / measured < 0.15, (preset, batch, planned, measured)


@pytest.mark.slow
@pytest.mark.parametrize("preset, batch", [("full", 8), ("head", 16)])
def test_planner_predicts_openvinos_measured_peak(mobilenet_bundles, preset, batch):
    """OpenVINO's CPU plugin has factors of its own (it keeps about twice onnxruntime's memory for a full step): the
    plan for it against a real training process's peak RSS on OpenVINO, MobileNetV2 224 px."""
    from edgeadapt.devices.bench import run_case

    manifest = Bundle.open(mobilenet_bundles[preset]).manifest
    measured = run_case(mobilenet_bundles[preset], batch, 2, steps=3, warmup=2, engine="openvino",
                        inference=False)["peak_rss_mb"]
    planned = planned_peak(manifest, batch, engine="openvino")
    assert abs(planned - measured) / measured < 0.15, (preset, batch, planned, measured)
    onnxruntimes = planned_peak(manifest, batch)
    assert abs(planned - measured) < abs(onnxruntimes - measured), (planned, onnxruntimes, measured)  # its own price


@pytest.mark.slow
def test_profile_budget_refuses_or_picks_a_batch(mobilenet_bundles):
    full = mobilenet_bundles["full"]
    with pytest.raises(ConfigError, match="MB over raspberry-pi-4's budget"):
        batch_for_profile(full, "raspberry-pi-4", 32, auto=False, threads=None)
    fit = batch_for_profile(full, "raspberry-pi-4", 32, auto=True, threads=None)
    manifest = Bundle.open(full).manifest
    priced = functools.partial(planned_peak, manifest, accumulating=True)
    assert priced(fit.batch_size) <= 1500 < priced(fit.batch_size * 2)
    assert fit.batch_size * fit.accumulate == 32 and fit.accumulate > 1  # micro-batches up to the batch asked for
    assert fit.threads == 4


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_bench_json_and_plot(bundle_factory, tmp_path):
    bundle = bundle_factory("tiny_cnn", "full")
    plot = tmp_path / "bench.png"
    result = run_cli("bench", bundle, "--batch-sizes", "2,4", "--steps", "2", "--warmup", "1", "--json",
                     "--plot", plot)
    assert result.returncode == 0, result.stderr
    cases = json.loads(result.stdout)["cases"]
    assert [c["batch_size"] for c in cases] == [2, 4]
    for case in cases:
        for key in ("preset", "batch_size", "step_ms_p50", "step_ms_p95", "peak_rss_mb", "predicted_peak_mb"):
            assert case[key] is not None
        assert case["step_ms_p95"] >= case["step_ms_p50"] > 0
        assert "onnxruntime-cpu" in case["inference_ms"]
    assert plot.stat().st_size > 10_000


def test_devices_command_is_honest_about_this_machine():
    from edgeadapt.runtime.engines import available

    result = run_cli("devices")
    assert result.returncode == 0
    import onnxruntime

    here = available()
    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert here["onnxruntime"][0] == "cpu" and ("cuda" in here["onnxruntime"]) == cuda
    for engine in ("onnxruntime", "openvino", "ort-training"):
        assert engine in result.stdout


def test_split_runs_are_planned_and_benched(bundle_factory, tmp_path):
    from edgeadapt.devices.planner import KEPT_FACTOR, MB, plan_split_memory, plan_summary

    bundle = bundle_factory("tiny_cnn", "head", input_size=(32,))
    manifest = Bundle.open(bundle).manifest
    split, whole = plan_split_memory(manifest, 8), plan_memory(manifest, 8)
    assert split.activations_mb == pytest.approx(KEPT_FACTOR * manifest.memory["suffix_kept_bytes_per_sample"] * 8 / MB)
    assert split.weights_mb > whole.weights_mb  # the prefix's inference session holds the frozen weights too
    info = plan_summary(Bundle.open(bundle))
    assert "split" in info and "memory plan, split run, batch 32" in info
    result = run_cli("bench", bundle, "--batch-sizes", "4", "--steps", "2", "--warmup", "1", "--split", "--json")
    assert result.returncode == 0, result.stderr
    case = json.loads(result.stdout)["cases"][0]
    assert case["preset"] == "head (split)" and "prefix onnxruntime-cpu" in case["inference_ms"]


def _profile(tmp_path, name, budget_mb):
    path = tmp_path / f"{name}.toml"
    path.write_text(f'name = "{name}"\ndescription = "test device"\ncores = 2\nthreads = 2\n'
                    f'memory_budget_mb = {budget_mb}\ntraining_backend = "cpu"\n'
                    'inference_backends = ["onnxruntime-cpu"]\nprefix_backend = "onnxruntime-cpu"\n'
                    'sources = ["test"]\n')
    return path


def test_a_profile_prices_the_engine_that_will_train(bundle_factory, tmp_path):
    """`train --profile P --engine openvino` is priced with OpenVINO's factors: a budget that onnxruntime's batch
    fits is refused for OpenVINO, and --auto-batch picks a smaller batch there."""
    bundle = bundle_factory("tiny_cnn", "full", input_size=(16,))
    manifest = Bundle.open(bundle).manifest
    budget = int(planned_peak(manifest, 32) + 1)
    assert planned_peak(manifest, 32, engine="openvino") > budget
    profile = _profile(tmp_path, "edge", budget)
    assert batch_for_profile(bundle, str(profile), 32, auto=False, threads=None).batch_size == 32
    with pytest.raises(ConfigError, match="over edge's budget"):
        batch_for_profile(bundle, str(profile), 32, auto=False, threads=None, engine="openvino")
    roomy_mb = int(planned_peak(manifest, 64, engine="openvino") + 1)
    roomy = _profile(tmp_path, "roomy", roomy_mb)
    on_ort = batch_for_profile(bundle, str(roomy), 8, auto=True, threads=None)
    on_openvino = batch_for_profile(bundle, str(roomy), 8, auto=True, threads=None, engine="openvino")
    assert 64 <= on_openvino.batch_size < on_ort.batch_size
    assert planned_peak(manifest, on_openvino.batch_size, engine="openvino") <= roomy_mb < \
        planned_peak(manifest, 2 * on_openvino.batch_size, engine="openvino")


@pytest.mark.slow
def test_auto_picks_by_budget_and_each_pick_fits_when_measured(tmp_path):
    from sklearn.datasets import load_digits

    from edgeadapt.devices.bench import run_case

    digits = load_digits()
    calibration = tmp_path / "calibration.npz"  # with it, auto may pick sparse (it needs samples to score)
    np.savez(calibration, x=(digits.images[:200] * 255 / 16).astype(np.uint8),
             y=np.array([f"class_{d}" for d in digits.target[:200]]))
    picks = {}
    cases = (("small", 180, ()), ("large", 4000, ()), ("sparse", 180, ("--calibration", calibration)))
    for name, budget, extra in cases:
        out = tmp_path / name
        result = run_cli("export", "mobilenet_v2", "--weights", "imagenet", "--classes", "10", "--trainable", "auto",
                         "--profile", _profile(tmp_path, name, budget), "--input-size", "64", "--out", out,
                         "--no-validate", *extra)
        assert result.returncode == 0, result.stderr
        manifest = Bundle.open(out).manifest
        batch = int(manifest.hyperparameters["batch_size"])
        accumulate = int(manifest.hyperparameters.get("accumulate", 1))  # micro-batches where memory forces them
        picks[name] = (manifest.preset, batch)
        assert any("trainable auto" in note for note in manifest.notes)
        assert accumulate == 1 or (batch < 8 <= batch * accumulate and manifest.preset != "head"), manifest.notes
        measured = run_case(out, batch, 2, steps=3, warmup=2, accumulate=accumulate)["peak_rss_mb"]
        assert measured <= budget, (name, manifest.preset, batch, measured)
    assert picks["small"] != picks["large"] and picks["large"] == ("full", 32)
    assert picks["sparse"][0] == "sparse" and picks["small"][0] != "sparse"


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_auto_needs_a_profile(tmp_path):
    from test_errors import assert_one_line_error

    assert_one_line_error(run_cli("export", "tiny_cnn", "--classes", "3", "--trainable", "auto", "--out",
                                  tmp_path / "b"), "needs --profile")


@pytest.mark.ort_training
def test_bench_times_every_engine_train_opens(bundle_factory):
    """bench's loop drives each engine through the one engine interface, ONNX Runtime training's included."""
    from edgeadapt.devices.bench_case import time_training

    bundle = Bundle.open(bundle_factory("tiny_cnn", "full", input_size=(16,), validate=False, split=False,
                                        backbone_lr_ratio=1.0, decay_norms=True, head=HeadRequest(num_classes=3)))
    for engine in ("onnxruntime", "ort-training"):
        times = time_training(bundle, 4, 1, steps=2, warmup=1, engine=engine)
        assert len(times) == 2 and all(t > 0 for t in times), engine


def test_bench_and_train_open_sessions_the_same_way(fresh_bundle, digits, monkeypatch):
    """`bench` times the engine `train` runs: both go through the runtime's engine factory and its session options
    (memory pattern off, threads), nothing of their own."""
    from edgeadapt.devices.bench_case import time_training
    from edgeadapt.runtime.engines import onnxruntime_engine
    from edgeadapt.runtime.trainer import TrainConfig, Trainer

    bundle = fresh_bundle("tiny_mlp", "full")  # exported (and validated) before the sessions are counted
    calls = []
    original = onnxruntime_engine.session_options

    def recording(threads=None):
        calls.append(threads)
        return original(threads)

    monkeypatch.setattr(onnxruntime_engine, "session_options", recording)
    time_training(Bundle.open(bundle), 4, 2, steps=1, warmup=0, engine="onnxruntime")
    from_bench = list(calls)
    calls.clear()
    Trainer(bundle, TrainConfig(epochs=1, threads=2, engine="onnxruntime")).fit(digits["train"])
    assert from_bench == [2] and calls == [2]


@pytest.mark.parametrize("preset, split", [("head", True), ("last:2", True), ("full", False)])
def test_one_price_for_auto_sparse_inspect_and_train(bundle_factory, tmp_path, preset, split):
    """The same trainable set priced four ways — `--trainable auto`'s and `sparse`'s search before the export,
    `inspect` and `train --profile/--auto-batch` after it — is one number, for split runs and whole graphs."""
    import re

    from edgeadapt.toolchain.auto import _planner
    from edgeadapt.toolchain.export import ExportOptions, make_source
    from edgeadapt.toolchain.presets import resolve_lists
    from edgeadapt.toolchain.pricing import pricing

    batch = 32
    options = dict(head=HeadRequest(num_classes=10), input_size=(32,))
    bundle = bundle_factory("tiny_cnn", preset, **options)
    manifest = Bundle.open(bundle).manifest
    assert (manifest.split is not None) == split
    info = json.loads(run_cli("inspect", bundle, "--json").stdout)
    inspected = info[f"memory plan, {'split run, ' if split else ''}batch {batch}"]["total_mb"]

    opts = ExportOptions(out=None, backbone="tiny_cnn", trainable=preset, **options)
    source = make_source(opts)
    lists = resolve_lists(source, preset)
    sizes = {i.name: int(np.prod(i.dims)) for i in source.graph.graph.initializer}
    total, trainable = sum(sizes[n] for n in lists.trainable + lists.frozen), sum(sizes[n] for n in lists.trainable)
    by_auto = _planner(source, opts, preset)(batch)
    by_sparse = pricing(source.graph, lists.trainable, opts, batch, total).peak(trainable)

    refused = run_cli("train", bundle, "unused.npz", "--profile", _profile(tmp_path, "under", round(inspected - 1, 1)),
                      "--batch-size", batch)
    by_train = float(re.search(r"needs ~([\d.]+) MB", refused.stderr).group(1))
    between = (by_auto + _planner(source, opts, preset)(2 * batch)) / 2  # over batch 32's price, under 64's
    fits = run_cli("train", bundle, "unused.npz", "--profile", _profile(tmp_path, "between", between), "--auto-batch")
    assert f"batch {batch}," in fits.stdout, fits.stdout + fits.stderr
    assert by_auto == pytest.approx(by_sparse, abs=1e-9)
    assert by_auto == pytest.approx(inspected, abs=0.051)
    assert by_train == pytest.approx(inspected, abs=0.051)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,preset,batch,split", [("minilm_l6", "lora:8", 32, True),
                                                         ("whisper_tiny_encoder", "full", 8, False)])
def test_planner_predicts_a_transformer_step(bundle_factory, backbone, preset, batch, split):
    """The transformer calibration against a real training process's peak RSS: within ±15% (the planner's own
    limit for these models; benchmarks/README.md gives every calibration cell)."""
    from edgeadapt.devices.bench import run_case
    from edgeadapt.devices.planner import planned_peak

    path = bundle_factory(backbone, preset, head=HeadRequest(num_classes=8),
                          input_size=(32,) if backbone == "minilm_l6" else None, validate=False)
    manifest = Bundle.open(path).manifest
    measured = run_case(path, batch, 2, steps=3, warmup=2, inference=False, split=split)["peak_rss_mb"]
    planned = planned_peak(manifest, batch, split=split)
    assert abs(planned - measured) / measured < 0.15, (backbone, preset, batch, planned, measured)
