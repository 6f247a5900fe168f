"""Fleet personalization on Flower: the split, a member's round, the simulation engine and the server's global model
checked against training done here, clipping, FedProx's pull, and refusal of a foreign bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, run_without_torch

pytest.importorskip("flwr", reason="the fleet extra: pip install 'edgeadapt[fleet]'")

from edgeadapt.fleet.local import Member, fingerprint, trainable_arrays, write_arrays  # noqa: E402
from edgeadapt.fleet.partition import dirichlet_split  # noqa: E402
from edgeadapt.runtime.bundle import Bundle  # noqa: E402
from edgeadapt.runtime.errors import ConfigError  # noqa: E402
from edgeadapt.runtime.inference import evaluate  # noqa: E402
from edgeadapt.runtime.trainer import TrainConfig, Trainer  # noqa: E402


def _flat(arrays: dict) -> np.ndarray:
    return np.concatenate([np.ravel(arrays[k]) for k in sorted(arrays)])


@pytest.mark.parametrize("alpha", [0.1, 100.0])
def test_dirichlet_split_is_a_partition_and_skews_with_small_alpha(alpha):
    labels = np.repeat(np.arange(10), 100)
    shares = dirichlet_split(labels, 8, alpha, seed=3)
    joined = np.sort(np.concatenate(shares))
    assert np.array_equal(joined, np.arange(len(labels)))  # every sample exactly once
    assert min(len(s) for s in shares) >= 10
    dominant = np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shares])
    assert (dominant > 0.4) if alpha < 1 else (dominant < 0.25)


def test_member_round_moves_only_trainable_tensors_and_refuses_foreign_bundles(fresh_bundle, bundle_factory, digits):
    bundle = Bundle.open(fresh_bundle("tiny_mlp", "head"))
    member = Member.open(bundle, digits["train"])
    start = trainable_arrays(bundle)
    assert sorted(start) == sorted(p.name for p in bundle.manifest.portable.layout)  # only the trainable set travels
    shifted = {k: v + 0.01 for k, v in start.items()}
    trained = member.train_on(shifted, epochs=1, seed=1)
    assert not np.allclose(_flat(trained), _flat(shifted))
    # the same training, done here with the plain trainer, from the same start: identical arrays
    reference = Bundle.open(shutil.copytree(bundle.path, bundle.path.parent / "reference"))
    write_arrays(reference, shifted)
    Trainer(reference, TrainConfig(epochs=1, seed=1, val_split=0.0)).fit(member.train)
    assert np.array_equal(_flat(trainable_arrays(reference)), _flat(trained))
    other = Bundle.open(bundle_factory("tiny_mlp", "full"))
    with pytest.raises(ConfigError, match="server's bundle"):
        from edgeadapt.fleet.local import check_fingerprint

        check_fingerprint(bundle, fingerprint(other))


def test_a_member_accumulates_micro_batches_as_its_node_config_says(bundle_factory, digits, tmp_path):
    """`fleet client --batch-size 16 --accumulate 4` reaches the member as node config; its round trains as one at
    batch 64 (to fp32 rounding), and an accumulation out of range is refused before Flower starts."""
    from types import SimpleNamespace

    from edgeadapt.fleet.apps import member_from_node

    template = bundle_factory("tiny_mlp", "full", optimizer="adamw")
    micro_path, big_path = (shutil.copytree(template, tmp_path / name) for name in ("micro", "big"))
    node = {"bundle": str(micro_path), "data": str(digits["train"]), "batch_size": 16, "accumulate": 4}
    micro = member_from_node(SimpleNamespace(node_config=node))
    assert (micro.config.batch_size, micro.config.accumulate) == (16, 4)
    big = Member.open(big_path, digits["train"], TrainConfig(batch_size=64))
    start = trainable_arrays(micro.bundle)
    by_micro, by_big = _flat(micro.train_on(start, epochs=2, seed=1)), _flat(big.train_on(start, epochs=2, seed=1))
    assert np.linalg.norm(by_micro - by_big) <= 1e-5 * np.linalg.norm(by_big)
    with pytest.raises(ConfigError, match="--accumulate"):
        Member.open(big_path, digits["train"], TrainConfig(accumulate=5000))


def test_proximal_term_keeps_local_training_near_the_global_model(fresh_bundle, digits):
    path = fresh_bundle("tiny_mlp", "full")
    bundle = Bundle.open(path)
    start = trainable_arrays(bundle)
    moved = {}
    for mu in (0.0, 50.0):
        write_arrays(bundle, start)
        Trainer(path, TrainConfig(epochs=2, seed=0, val_split=0.0, lr=0.01, proximal_mu=mu)).fit(digits["train"])
        moved[mu] = float(np.linalg.norm(_flat(trainable_arrays(bundle)) - _flat(start)))
    assert 0 < moved[50.0] < 0.5 * moved[0.0], moved


def _simulate(bundle: Path, data: Path, workdir: Path, *extra: str) -> dict:
    result = run_cli("fleet", "simulate", bundle, data, "--workdir", workdir, "--json", *extra, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_simulation_global_model_is_the_clients_clipped_update_and_a_normal_bundle_state(fresh_bundle, digits,
                                                                                         tmp_path):
    """One client, one round, `--clip 0.05`: FedAvg of one update is that update, so the server bundle must hold
    exactly the client's own training done here, its update scaled down to the clipping norm (Flower's fixed
    clipping, noise 0); evaluate and deploy work on it."""
    path = fresh_bundle("tiny_mlp", "full")
    workdir = tmp_path / "work"
    clip = 0.05
    report = _simulate(path, digits["train"], workdir, "--clients", "1", "--rounds", "1", "--local-epochs", "2",
                       "--clip", str(clip))
    server = Bundle.open(workdir / "server")
    client_data = workdir / "clients" / "0" / "data.fleet.npz"
    replay = Bundle.open(shutil.copytree(path, tmp_path / "replay"))
    initial = trainable_arrays(Bundle.open(path))
    start = _flat(initial).astype(np.float64)
    update = _flat(Member.open(replay, client_data).train_on(initial, epochs=2, seed=1)) - start
    assert np.linalg.norm(update) > 4 * clip  # the clipping is at work
    expected = start + update * (clip / np.linalg.norm(update))
    np.testing.assert_allclose(_flat(trainable_arrays(server)), expected, rtol=0, atol=1e-6)
    # the reported global accuracy is what `evaluate` computes on the held-out part, whole graph
    held = np.load(workdir / "server" / "held_out.fleet.npz")
    from edgeadapt.runtime.data import Dataset

    metrics = evaluate(server, Dataset(held["samples"], held["targets"], False))
    assert abs(metrics.accuracy - report["rounds"][0]["global_accuracy"]) < 1e-9
    assert run_cli("deploy", workdir / "server", "--out", tmp_path / "model.onnx").returncode == 0
    assert Bundle.open(path).manifest == server.manifest  # the user's bundle itself is left alone
    # only the trainable tensors travel: per client and round, up = one trainable set (plus Flower's framing)
    trainable = sum(p.size * 4 for p in server.manifest.portable.layout)
    first = report["rounds"][0]
    assert trainable <= first["bytes_up"] <= trainable + 1024
    assert 2 * trainable <= first["bytes_down"] <= 2 * trainable + 2048  # train + evaluate messages
    assert report["local_only"]["epochs"] == 2


def test_simulation_reports_every_round_and_its_global_model_learned(fresh_bundle, digits, tmp_path):
    """Three rounds of three clients with near-IID shares (Dirichlet 100; at the default 0.3 three rounds of two
    or three clients stay near chance, as FedAvg on such skew does): every round is reported, and the server's
    global model — evaluated here, independently of the report, on digits no client saw — beats the untrained one
    by far."""
    path = fresh_bundle("tiny_mlp", "full")
    before = json.loads(run_cli("evaluate", path, digits["test"], "--json").stdout)["accuracy"]
    report = _simulate(path, digits["train"], tmp_path / "w", "--clients", "3", "--rounds", "3", "--local-epochs",
                       "3", "--non-iid", "100")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    for r in report["rounds"]:
        assert r["clients"] == 3 and 0 <= r["client_accuracy_min"] <= r["client_accuracy_mean"] <= 1
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["seconds"] > 0
    after = json.loads(run_cli("evaluate", tmp_path / "w" / "server", digits["test"], "--json").stdout)["accuracy"]
    assert before < 0.2 and after > before + 0.12, (before, after)  # chance is 0.1


def test_fleet_imports_without_torch():
    result = run_without_torch("""
        import sys
        import edgeadapt.fleet.apps, edgeadapt.fleet.simulate, edgeadapt.fleet.deployment, edgeadapt.fleet.cli
        assert not sys.modules.get("torch")
        print("ok")
    """)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_fleet_without_flower_says_how_to_install(tmp_path):
    result = run_without_torch(f"""
        import sys
        sys.modules["flwr"] = None
        sys.argv = ["edgeadapt", "fleet", "simulate", "{tmp_path}", "{tmp_path}"]
        from edgeadapt.cli import main
        main()
    """)
    assert result.returncode == 2
    assert "pip install 'edgeadapt[fleet]'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a Flower simulation of a transformer; CI runs it
def test_lora_bundle_fleet_trains_with_only_the_adapters_and_head_travelling(fresh_bundle, tmp_path):
    """A text LoRA bundle on Flower: one client, one round equals that client's own training here; only the
    adapters and the head travel (bytes up = their size), the frozen encoder stays on the device."""
    from conftest import wordnet_csv

    labels = ("act", "animal", "food", "location")
    from edgeadapt.toolchain.build import HeadRequest

    path = fresh_bundle("tiny_bert", "lora:2", head=HeadRequest(labels=labels))
    data = wordnet_csv(tmp_path / "texts.csv", labels, 20)
    workdir = tmp_path / "work"
    report = _simulate(path, data, workdir, "--clients", "1", "--rounds", "1", "--local-epochs", "2")
    server = Bundle.open(workdir / "server")
    names = [p.name for p in server.manifest.portable.layout]
    assert names and all(n.endswith((".lora_A", ".lora_B")) or n.startswith("classifier.") for n in names)
    replay = Bundle.open(shutil.copytree(path, tmp_path / "replay"))
    expected = Member.open(replay, workdir / "clients" / "0" / "data.fleet.npz").train_on(
        trainable_arrays(Bundle.open(path)), epochs=2, seed=1)
    np.testing.assert_allclose(_flat(trainable_arrays(server)), _flat(expected), rtol=0, atol=1e-7)
    adapters = sum(p.size * 4 for p in server.manifest.portable.layout)
    framing = 1024 + 160 * len(names)  # Flower's message and per-array framing
    assert adapters <= report["rounds"][0]["bytes_up"] <= adapters + framing
    assert adapters < 0.2 * 4 * (server.manifest.trainable_params + server.manifest.frozen_params)
    assert run_cli("deploy", workdir / "server", "--out", tmp_path / "model.onnx").returncode == 0
