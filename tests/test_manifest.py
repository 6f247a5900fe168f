"""The manifest is the host→device contract: it round-trips, and every malformed variant is refused clearly."""

import json

import pytest

from edgeadapt.runtime.errors import BundleError
from edgeadapt.runtime.manifest import SCHEMA_VERSION, Manifest


@pytest.fixture
def manifest_json(bundle_factory) -> dict:
    return json.loads((bundle_factory("tiny_cnn", "head") / "manifest.json").read_text())


def test_round_trip(manifest_json):
    manifest = Manifest.from_json(json.dumps(manifest_json))
    assert json.loads(manifest.to_json()) == manifest_json
    assert manifest.schema_version == SCHEMA_VERSION


def test_records_the_contract(manifest_json):
    for field in ("files", "trainable", "frozen", "buffers", "input", "labels", "loss", "optimizer", "opset",
                  "ir_version", "onnxruntime_version", "bn_policy", "hyperparameters"):
        assert manifest_json[field] not in (None, "", [])
    assert set(manifest_json["files"]) >= {"train_step.onnx", "forward.onnx", "state.safetensors"}
    assert all(len(h) == 64 for h in manifest_json["files"].values())


@pytest.mark.parametrize("mutate, message", [
    (lambda m: m.update(schema_version=99), "schema_version 99"),
    (lambda m: m.pop("labels"), "misses the field 'labels'"),
    (lambda m: m.update(trainable_params="12"), "trainable_params must be int"),
    (lambda m: m.update(labels="a,b"), "labels must be a list"),
    (lambda m: m["input"].update(shape=["a"]), "input: shape must be int"),
    (lambda m: m.update(trainable_params=True), "must be int"),
])
def test_malformed_manifests_are_refused(manifest_json, mutate, message):
    mutate(manifest_json)
    with pytest.raises(BundleError, match=message):
        Manifest.from_json(json.dumps(manifest_json))


@pytest.mark.parametrize("text", ["not json", "[]", "", "{\"schema_version\": 1}"])
def test_not_a_manifest(text):
    with pytest.raises(BundleError):
        Manifest.from_json(text)
