"""Fuzzing the loaders with hypothesis: whatever the bytes, the only exception is the documented BundleError."""

import json
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeadapt.runtime.archive import unpack
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import BundleError
from edgeadapt.runtime.manifest import Manifest

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4), max_leaves=12)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.text(max_size=300))
def test_manifest_from_any_text(text):
    try:
        Manifest.from_json(text)
    except BundleError:
        pass


@FUZZ
@given(st.data())
def test_manifest_with_mutated_fields(bundle_factory, data):
    valid = json.loads((bundle_factory("tiny_cnn", "head") / "manifest.json").read_text())
    field = data.draw(st.sampled_from(sorted(valid)))
    mutated = dict(valid)
    if data.draw(st.booleans()):
        mutated[field] = data.draw(JSON)
    else:
        mutated.pop(field)
    if isinstance(valid.get("input"), dict) and data.draw(st.booleans()):
        sub = data.draw(st.sampled_from(sorted(valid["input"])))
        mutated["input"] = {**valid["input"], sub: data.draw(JSON)}
    try:
        Manifest.from_json(json.dumps(mutated))
    except BundleError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_bundle_with_random_manifest_bytes(bundle_factory, tmp_path_factory, blob):
    target = tmp_path_factory.mktemp("fuzz") / "bundle"
    shutil.copytree(bundle_factory("tiny_cnn", "head"), target)
    (target / "manifest.json").write_bytes(blob)
    try:
        Bundle.open(target)
    except BundleError:
        pass


@FUZZ
@given(st.binary(max_size=600))
def test_unpack_random_archive_bytes(tmp_path_factory, blob):
    root = tmp_path_factory.mktemp("archive")
    (root / "b.tar.gz").write_bytes(blob)
    try:
        unpack(root / "b.tar.gz", root / "out")
    except BundleError:
        pass
    assert not (root / "out").exists()
