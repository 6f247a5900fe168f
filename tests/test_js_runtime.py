"""The JavaScript runtime (runtime/js) against the Python runtime, numpy and Pillow: the same bundles train to the
same bytes, a run moves between the runtimes mid-training, a killed Node trainer resumes exactly, images are
prepared pixel for pixel as Pillow prepares them, and the sealed-bundle rules hold. Node's own unit tests run too.

These need Node with runtime/js's packages (`npm --prefix runtime/js ci --ignore-scripts`, as the README's install
line does); they fail, never skip, without them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from app_runtimes import python_steps  # benchmarks/: the Python runtime over the same fixed steps

from conftest import run_cli
from test_errors import assert_one_line_error

JS = Path(__file__).resolve().parents[1] / "runtime" / "js"
CLI = JS / "dist" / "node" / "cli.js"
TRAIN = ["--epochs", "2", "--batch-size", "8", "--seed", "3"]


@pytest.fixture(scope="session")
def js_runtime() -> Path:
    """The package built from its sources once per session (tsc), over the installed node_modules."""
    if shutil.which("node") is None or not (JS / "node_modules" / "onnxruntime-node").is_dir():
        pytest.fail("the JavaScript runtime's packages are missing: run `npm --prefix runtime/js ci --ignore-scripts`"
                    " (the README's install line does).")
    built = subprocess.run(["npm", "run", "--silent", "build"], cwd=JS, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    return JS


def js(*args, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["node", str(CLI), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          **kwargs)


def node(script: str, *args, timeout: int = 300) -> str:
    """Run an ES module `script` (in runtime/js, so it imports ./dist/…) and return its stdout."""
    done = subprocess.run(["node", "--input-type=module", "-e", script, *map(str, args)], cwd=JS, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout


def state_parts(bundle: Path) -> tuple[dict, bytes, dict]:
    """(tensor headers, tensor bytes, progress) of a bundle's state file, read here with the standard library."""
    data = (bundle / "state.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    metadata = header.pop("__metadata__")
    return header, data[8 + length:], json.loads(metadata.get("edgeadapt.progress", "null"))


def state_tensors(bundle: Path) -> dict[str, np.ndarray]:
    header, body, _ = state_parts(bundle)
    dtypes = {"F32": np.float32, "F64": np.float64, "I64": np.int64, "I32": np.int32, "U8": np.uint8}
    return {name: np.frombuffer(body[start:end], dtypes[entry["dtype"]]).reshape(entry["shape"])
            for name, entry in header.items() for start, end in [entry["data_offsets"]]}


def comparable(progress: dict, resumed: bool) -> dict:
    """Progress without what differs between any two runs (the run id, clock times; after a resume, the train loss
    and accuracy of the interrupted epoch, which count only the batches after the resume, in both runtimes)."""
    left_out = ("time", "seconds", "run") + (("train_loss", "train_accuracy") if resumed else ())
    records = [{k: v for k, v in r.items() if k not in left_out} for r in progress["records"]]
    return {**{k: v for k, v in progress.items() if k != "run_id"}, "records": records}


def assert_same_progress(a: dict, b: dict, resumed: bool = False) -> None:
    a, b = comparable(a, resumed), comparable(b, resumed)
    assert a.keys() == b.keys()
    for key in a:
        if key != "records":
            assert a[key] == b[key], key
    for ra, rb in zip(a["records"], b["records"], strict=True):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key  # val loss: sums in other orders
            else:
                assert rb[key] == value, key


def copies(template: Path, root: Path, *names: str) -> list[Path]:
    out = []
    for name in names:
        shutil.copytree(template, root / name)
        out.append(root / name)
    return out


def test_node_unit_tests(js_runtime):
    done = subprocess.run(["npm", "test", "--silent"], cwd=JS, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_batch_order_is_numpys(js_runtime):
    cases = [(0, 10), (1, 1), (42, 1000), (2**33 + 7, 257), ([3, 1], 12), ([0, 7], 100), ([123456789, 5], 999)]
    script = "import {permutation} from './dist/rng.js'; const cases = JSON.parse(process.argv[1]);" \
             "console.log(JSON.stringify(cases.map(([s, n]) => permutation(s, n))));"
    got = json.loads(node(script, json.dumps(cases)))
    for (seed, n), order in zip(cases, got):
        assert order == np.random.default_rng(seed).permutation(n).tolist(), (seed, n)


def test_validation_split_is_the_python_runtimes(js_runtime):
    """The held-out rows for a seed, as the Python runtime's `split` picks them (Python's round: 25 × 0.1 → 2)."""
    from edgeadapt.runtime.data import Dataset, split

    cases = [(25, 0.1, 0), (15, 0.1, 3), (100, 0.2, 7), (9, 0.5, 1)]
    script = """import {split} from './dist/data.js';
const out = JSON.parse(process.argv[1]).map(([n, fraction, seed]) => {
  const d = {samples: new Float32Array(n), sampleShape: [1], targets: Int32Array.from({length: n}, (_, i) => i),
    isImage: false, names: Array.from({length: n}, (_, i) => String(i)), skipped: []};
  const [, val] = split(d, fraction, seed);
  return val ? Array.from(val.targets) : [];
});
console.log(JSON.stringify(out));"""
    got = json.loads(node(script, json.dumps(cases)))
    for (n, fraction, seed), held_out in zip(cases, got):
        data = Dataset(np.zeros((n, 1), np.float32), np.arange(n), False)
        val = split(data, fraction, seed)[1]
        assert held_out == (val.targets.tolist() if val is not None else []), (n, fraction, seed)


@pytest.fixture(scope="session")
def odd_photos(tmp_path_factory) -> list[Path]:
    """Real photos (scikit-image's) at odd sizes, as JPEG and PNG, colour and grayscale."""
    import skimage.data
    from PIL import Image

    root = tmp_path_factory.mktemp("odd_photos")
    files = []
    for name in ("astronaut", "coffee", "chelsea", "camera"):
        image = Image.fromarray(getattr(skimage.data, name)())
        width, height = image.size
        image.crop((3, 5, width - 17, height - 2)).save(root / f"{name}.jpg", quality=87)
        image.resize((width // 3 + 1, height // 3 + 2)).save(root / f"{name}.png")
        files += [root / f"{name}.jpg", root / f"{name}.png"]
    return files


PREPARED = [("RGB", (96, 96), 0.875), ("L", (37, 53), 1.0), ("RGB", (224, 160), 0.875)]  # channels, size, crop


def test_images_are_prepared_as_the_python_runtime_prepares_them(js_runtime, odd_photos):
    from edgeadapt.runtime.data import decode_image

    specs = PREPARED
    script = """
import {decodeImage} from './dist/node/index.js';
import {prepareImage} from './dist/image.js';
const [files, specs] = JSON.parse(process.argv[1]);
const out = [];
for (const file of files) for (const [channels, resize, crop] of specs)
  out.push(Array.from(prepareImage(await decodeImage(file), {channels, resize, crop})));
console.log(JSON.stringify(out));"""
    got = iter(json.loads(node(script, json.dumps([[str(f) for f in odd_photos], specs]))))
    for file in odd_photos:
        for channels, size, crop in specs:
            want = decode_image(file, channels, size, crop).astype(np.int64).ravel()
            diff = np.abs(np.asarray(next(got)) - want)
            assert diff.max() <= 1, (file.name, channels, size, int(diff.max()))


@pytest.mark.slow  # Chromium
def test_browser_prepares_images_as_the_python_runtime(js_runtime, odd_photos, tmp_path):
    """The same JPEG and PNG photos of odd sizes decoded by Chromium (createImageBitmap and a canvas) and prepared by
    the core: within one uint8 level of Pillow's per pixel, before normalisation."""
    from edgeadapt.runtime.data import decode_image

    for file in odd_photos:
        shutil.copy(file, tmp_path / file.name)
    done = subprocess.run(["node", str(JS / "test" / "browser" / "run.mjs"), "prepare", str(tmp_path), json.dumps({
        "urls": [f"/data/{f.name}" for f in odd_photos], "specs": PREPARED})], cwd=JS, capture_output=True,
        text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = iter(json.loads(done.stdout.strip().splitlines()[-1]))
    for file in odd_photos:
        for channels, size, crop in PREPARED:
            want = decode_image(file, channels, size, crop).astype(np.int64).ravel()
            diff = np.abs(np.asarray(next(got)) - want)
            assert diff.max() <= 1, (file.name, channels, size, int(diff.max()))


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int, channels: int = 1) -> Path:
    """PCM WAV of float samples in [-1, 1] (8-bit unsigned, 16/24/32-bit signed), written with the standard library."""
    import wave

    frames = np.repeat(samples[:, None], channels, axis=1).ravel()
    scaled = np.clip(np.round(frames * (2 ** (8 * width - 1) - 1)), -(2 ** (8 * width - 1)), 2 ** (8 * width - 1) - 1)
    if width == 1:
        raw = (scaled + 128).astype(np.uint8).tobytes()
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in scaled.astype(np.int64))
    else:
        raw = scaled.astype(f"<i{width}").tobytes()
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(raw)
    return path


def test_text_and_speech_front_ends_match_the_python_runtimes(js_runtime, tmp_path):
    """WordPiece ids of MiniLM's vocabulary on 3,000 WordNet texts and the hard cases, equal to the Python runtime's
    (which equal Hugging Face `tokenizers`', tests/test_text_speech.py); log-mel features of espeak-ng speech as
    8/16/24/32-bit, mono and stereo WAVs at 8-48 kHz, within 1e-5 of the Python runtime's."""
    from datasets import all_wordnet_texts, speak
    from test_text_speech import HARD_TEXTS, minilm_vocabulary

    from edgeadapt.runtime.audio import load_clip, read_wav
    from edgeadapt.runtime.manifest import AudioSpec
    from edgeadapt.runtime.text import WordPiece, token_spec

    vocab = minilm_vocabulary()
    words = vocab.read_text(encoding="utf-8").split("\n")[:-1]
    spec = token_spec(words, "vocab.txt", 64)
    texts = HARD_TEXTS + all_wordnet_texts()[::37][:3000]
    (tmp_path / "texts.json").write_text(json.dumps(texts), encoding="utf-8")
    speech, rate = read_wav(speak("seventeen", "en-us+f2", 160, 50, tmp_path / "spoken.wav"))
    clips = [(f"{r}-{w}-{c}.wav", r, w, c) for r, w, c in ((8000, 2, 1), (16000, 2, 1), (22050, 1, 1), (44100, 3, 2),
                                                          (48000, 4, 1), (11025, 2, 2))]
    from edgeadapt.runtime.audio import resample
    for name, r, w, c in clips:
        write_wav(tmp_path / name, resample(speech, rate, r) * 0.9, r, w, c)
    audio = AudioSpec(sample_rate=16000, samples=16000, n_mels=80)
    script = """
import fs from 'node:fs';
import {WordPiece, wavFeatures} from './dist/index.js';
const [root, vocabFile, specText, audioText] = process.argv.slice(1);
const spec = JSON.parse(specText);
const ids = WordPiece.fromText(fs.readFileSync(vocabFile, 'utf8'), spec)
  .encodeBatch(JSON.parse(fs.readFileSync(root + '/texts.json', 'utf8')));
const names = fs.readdirSync(root).filter((n) => n.endsWith('.wav') && n !== 'spoken.wav').sort();
const features = Object.fromEntries(names.map((n) => [n, Array.from(wavFeatures(new Uint8Array(fs.readFileSync(
  root + '/' + n)), JSON.parse(audioText), n))]));
console.log(JSON.stringify({ids: Array.from(ids), features}));"""
    from dataclasses import asdict
    got = json.loads(node(script, tmp_path, vocab, json.dumps(asdict(spec)), json.dumps(asdict(audio))))
    want_ids = WordPiece(words, spec).encode_batch(texts)
    got_ids = np.asarray(got["ids"]).reshape(want_ids.shape)
    mismatched = [t[:60] for t, a, b in zip(texts, got_ids, want_ids) if not np.array_equal(a, b)]
    assert not mismatched, mismatched[:3]
    for name, *_ in clips:
        want = load_clip(tmp_path / name, audio)
        diff = np.abs(np.asarray(got["features"][name]).reshape(want.shape) - want).max()
        assert diff <= 1e-5, (name, diff)


@pytest.mark.slow  # CLI subprocesses; CI runs it
@pytest.mark.parametrize("kind", ["text", "speech"])
def test_node_cli_trains_text_and_speech_bundles_as_python_does(js_runtime, bundle_factory, tmp_path, kind):
    """The Node CLI on a text bundle (WordNet glosses: a CSV, then .txt class folders) and a speech bundle (espeak-ng
    WAV class folders) → the Python runtime's parameters, and the same held-out evaluation by both."""
    from conftest import spoken_folder, wordnet_csv
    from edgeadapt.toolchain.build import HeadRequest

    if kind == "text":
        labels = ("act", "animal", "food")
        template = bundle_factory("tiny_bert", "lora:2", head=HeadRequest(labels=labels))
        table = wordnet_csv(tmp_path / "texts.csv", labels, 8)
        folder = tmp_path / "folders"
        for i, row in enumerate(csv.DictReader(table.open(encoding="utf-8"))):
            (folder / row["label"]).mkdir(parents=True, exist_ok=True)
            (folder / row["label"] / f"{i:03}.txt").write_text(row["text"], encoding="utf-8")
        sources = [table, folder]
    else:
        template = bundle_factory("tiny_whisper", "last:1", head=HeadRequest(labels=("yes", "no", "up")))
        sources = [spoken_folder(tmp_path / "speech", ("yes", "no", "up"))]
    for source in sources:
        (tmp_path / f"runs-{source.stem}").mkdir()
        python, javascript = copies(template, tmp_path / f"runs-{source.stem}", "python", "javascript")
        assert run_cli("train", python, source, *TRAIN, "--quiet").returncode == 0
        done = js("train", javascript, source, *TRAIN)
        assert done.returncode == 0, done.stderr
        for name, tensor in state_tensors(python).items():
            np.testing.assert_allclose(state_tensors(javascript)[name], tensor, rtol=1e-5, atol=1e-6, err_msg=name)
        by_python, by_js = evaluate_json(run_cli, javascript, source), evaluate_json(js, javascript, source)
        assert by_js["loss"] == pytest.approx(by_python["loss"], rel=1e-5)
        assert by_js["accuracy"] == by_python["accuracy"]
        predicted = [runner("predict", javascript, source) for runner in (run_cli, js)]
        assert predicted[1].returncode == 0 and predicted[1].stdout == predicted[0].stdout


@pytest.mark.parametrize("preset,accumulation", [("head", ()), ("full", ()), ("head", ("--accumulate", "3")),
                                                ("full", ("--accumulate", "2"))])
def test_same_steps_give_the_same_state_file(js_runtime, bundle_factory, digit_image_npz, tmp_path, preset,
                                             accumulation):
    """20+ steps on each runtime from the same bundle: identical tensors and progress with the same onnxruntime
    release (the plugin's host); with another (a host without the plugin), tensors and losses as close as two releases'
    kernels allow. Head trains a split bundle's suffix on prefix features in both; with `--accumulate`, each update
    is accumulated micro-batches (the accumulating step) in both."""
    import onnxruntime

    versions = json.loads(node("import ort from 'onnxruntime-node'; console.log(JSON.stringify(ort.env.versions))"))
    template = bundle_factory("tiny_cnn", preset, input_size=(16,))
    python, javascript = copies(template, tmp_path, "python", "javascript")
    assert run_cli("train", python, digit_image_npz, *TRAIN, *accumulation, "--quiet").returncode == 0
    done = js("train", javascript, digit_image_npz, *TRAIN, *accumulation)
    assert done.returncode == 0, done.stderr
    (py_header, py_body, py_progress), (js_header, js_body, js_progress) = state_parts(python), state_parts(javascript)
    assert py_progress["step"] >= 20 and json.loads(py_progress["run_config"])["accumulate"] == \
        int(accumulation[-1] if accumulation else 1)
    if versions["node"] == onnxruntime.__version__:
        assert js_header == py_header and js_body == py_body
        assert_same_progress(py_progress, js_progress)
        return
    assert js_header.keys() == py_header.keys()
    for name, tensor in state_tensors(python).items():
        np.testing.assert_allclose(state_tensors(javascript)[name], tensor, rtol=1e-5, atol=1e-6, err_msg=name)
    for py_record, js_record in zip(py_progress["records"], js_progress["records"], strict=True):
        assert js_record["val_loss"] == pytest.approx(py_record["val_loss"], rel=1e-5)


def evaluate_json(runner, bundle, data) -> dict:
    done = runner("evaluate", bundle, data, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_a_run_moves_between_the_runtimes(js_runtime, bundle_factory, digit_image_npz, tmp_path):
    """Python trains 2 epochs → JS trains 2 more (a new run from those parameters) → both evaluate the same; the
    result is the one of Python training both runs."""
    template = bundle_factory("tiny_cnn", "full", input_size=(16,))
    mixed, python = copies(template, tmp_path, "mixed", "python")
    for bundle in (mixed, python):
        assert run_cli("train", bundle, digit_image_npz, *TRAIN, "--quiet").returncode == 0
    assert js("train", mixed, digit_image_npz, *TRAIN).returncode == 0
    assert run_cli("train", python, digit_image_npz, *TRAIN, "--quiet").returncode == 0
    assert state_parts(mixed)[1] == state_parts(python)[1]
    by_python, by_js = evaluate_json(run_cli, mixed, digit_image_npz), evaluate_json(js, mixed, digit_image_npz)
    assert by_js["loss"] == pytest.approx(by_python["loss"], rel=1e-5)
    assert by_js["accuracy"] == by_python["accuracy"] and by_js["confusion"] == by_python["confusion"]


def _progress_step(bundle: Path) -> int:
    try:
        progress = state_parts(bundle)[2]
    except (ValueError, struct.error, KeyError):
        return 0
    return 0 if progress is None or progress["finished"] else progress["step"]


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_killed_runs_resume_exactly_on_either_runtime(js_runtime, bundle_factory, digit_image_npz, tmp_path):
    """SIGKILL of the Node CLI mid-run → `edgeadapt-js train --resume`; a Python run stopped by its time limit →
    the Node CLI resumes it; both end with the weights of an uninterrupted Python run."""
    options = ["--epochs", "6", "--batch-size", "4", "--seed", "1", "--checkpoint-every", "5"]
    template = bundle_factory("tiny_cnn", "full", input_size=(16,))
    reference, killed, handed = copies(template, tmp_path, "reference", "killed", "handed")
    assert run_cli("train", reference, digit_image_npz, *options, "--quiet").returncode == 0
    want = state_parts(reference)

    trainer = subprocess.Popen(["node", str(CLI), "train", killed, digit_image_npz, *options],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while _progress_step(killed) < 10 and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait()
    assert 0 < _progress_step(killed) < 6 * 75, "the kill did not land mid-run"
    done = js("train", killed, digit_image_npz, *options, "--resume")
    assert done.returncode == 0, done.stderr
    assert state_parts(killed)[1] == want[1]
    assert_same_progress(want[2], state_parts(killed)[2], resumed=True)
    lines = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == list(range(1, 7)), "every epoch logged once"

    stopped = run_cli("train", handed, digit_image_npz, *options, "--max-minutes", "0.0001", "--quiet")
    assert stopped.returncode == 0 and _progress_step(handed) > 0
    done = js("train", handed, digit_image_npz, *options, "--resume")
    assert done.returncode == 0, done.stderr
    assert state_parts(handed)[1] == want[1]


@pytest.mark.slow  # a real MobileNetV2 export and two trainings
def test_node_cli_reaches_the_python_runtimes_accuracy_on_a_real_image_folder(js_runtime, digit_images, tmp_path):
    """MobileNetV2 (ImageNet weights) at 96 px, head, on 8×8 digit scans as PNG files: the same held-out accuracy."""
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    train, test = tmp_path / "train", tmp_path / "test"
    for folder in sorted(digit_images.iterdir()):
        files = sorted(folder.iterdir())
        for part, chosen in ((train, files[:12]), (test, files[12:])):
            (part / folder.name).mkdir(parents=True)
            for file in chosen:
                shutil.copy(file, part / folder.name / file.name)
    template = export_bundle(ExportOptions(out=tmp_path / "bundle", backbone="mobilenet_v2", weights="imagenet",
                                           head=HeadRequest(labels=tuple(str(i) for i in range(10))),
                                           input_size=(96,), validate=False)).out
    python, javascript = copies(template, tmp_path, "python", "javascript")
    options = ["--epochs", "4", "--batch-size", "16", "--seed", "0"]
    assert run_cli("train", python, train, *options, "--quiet").returncode == 0
    done = js("train", javascript, train, *options)
    assert done.returncode == 0, done.stderr
    accuracy = {name: evaluate_json(run_cli, bundle, test)["accuracy"] for name, bundle in
                (("python", python), ("javascript", javascript))}
    assert accuracy["python"] > 0.5, accuracy  # it learned: 10 classes
    assert abs(accuracy["javascript"] - accuracy["python"]) <= 0.01, accuracy


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_sealed_bundle_rules_hold_in_javascript(js_runtime, bundle_factory, digit_image_npz, tmp_path):
    """S1-S9 as the Node CLI applies them: tampered files, unsigned bundles under --trusted-key, a state another
    device trained; a state the Python runtime trained on this device is this device's."""
    assert run_cli("keygen", tmp_path / "key").returncode == 0
    public = tmp_path / "key.pub"
    signed = tmp_path / "signed"
    done = run_cli("export", "tiny_cnn", "--classes", "10", "--trainable", "full", "--input-size", "16", "--sign",
                   tmp_path / "key", "--out", signed, "--no-validate")
    assert done.returncode == 0, done.stderr
    assert js("train", signed, digit_image_npz, *TRAIN, "--trusted-key", public).returncode == 0
    assert run_cli("evaluate", signed, digit_image_npz, "--trusted-key", public).returncode == 0, "Python trusts it"

    unsigned, tampered, foreign = copies(bundle_factory("tiny_cnn", "full", input_size=(16,)), tmp_path,
                                         "unsigned", "tampered", "foreign")
    assert_one_line_error(js("train", unsigned, digit_image_npz, "--trusted-key", public), "not signed")
    graph = tampered / "forward.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + bytes([graph.read_bytes()[-1] ^ 1]))
    before = (tampered / "state.safetensors").read_bytes()
    assert_one_line_error(js("train", tampered, digit_image_npz), "does not match the sha256")
    assert (tampered / "state.safetensors").read_bytes() == before, "nothing changed"

    other_device = {**os.environ, "EDGEADAPT_DEVICE_KEY": str(tmp_path / "other-device.key")}
    shutil.rmtree(foreign)
    shutil.copytree(signed, foreign)
    assert js("train", foreign, digit_image_npz, *TRAIN, env=other_device).returncode == 0
    assert_one_line_error(js("evaluate", foreign, digit_image_npz, "--trusted-key", public), "neither the exported")
    assert js("evaluate", foreign, digit_image_npz).returncode == 0, "without a trusted key it is usable (S9)"


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_an_app_pack_trains_in_node(js_runtime, bundle_factory, digit_image_npz, tmp_path):
    """`pack --for app` → `unpack` → the Node CLI trains and evaluates it as the Python runtime does; a file planted
    where a left-out ORT training artifact was must still match the manifest (S10)."""
    from edgeadapt.runtime.manifest import Manifest, ort_training_files

    template = bundle_factory("tiny_cnn", "head", input_size=(16,))
    manifest = Manifest.from_json((template / "manifest.json").read_text())
    left_out = [name for name in ort_training_files(manifest) if (template / name).exists()]
    assert run_cli("pack", template, tmp_path / "app.tar.gz", "--for", "app").returncode == 0
    assert run_cli("unpack", tmp_path / "app.tar.gz", tmp_path / "app").returncode == 0
    app = tmp_path / "app"
    assert not any((app / name).exists() for name in left_out)
    done = js("train", app, digit_image_npz, *TRAIN)
    assert done.returncode == 0, done.stderr
    python, = copies(template, tmp_path, "python")
    assert run_cli("train", python, digit_image_npz, *TRAIN, "--quiet").returncode == 0
    assert evaluate_json(js, app, digit_image_npz)["accuracy"] == evaluate_json(run_cli, python, digit_image_npz)[
        "accuracy"]
    if left_out:  # the host exported them (the [ort-training] plugin)
        (app / left_out[0]).write_bytes(b"planted")
        assert_one_line_error(js("evaluate", app, digit_image_npz), left_out[0], "sha256")


@pytest.mark.slow  # CLI subprocesses; CI runs it
@pytest.mark.parametrize("args, fragments", [
    (["train", "{bundle}", "{data}", "--epochs", "two"], ["--epochs takes a whole number"]),
    (["train", "{missing}", "{data}"], ["does not exist"]),
    (["train", "{bundle}", "{missing}"], ["does not exist"]),
    (["evaluate", "{bundle}", "{labels}"], ["label 'eleven'"]),
    (["train", "{bundle}", "{data}", "--schedule", "wavy"], ["unknown --schedule"]),
    (["fly", "{bundle}", "{data}"], ["unknown command"]),
])
def test_user_errors_are_one_line_and_change_nothing(js_runtime, fresh_bundle, digit_image_npz, tmp_path, args,
                                                     fragments):
    bundle = fresh_bundle("tiny_cnn", "full", input_size=(16,))
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((3, 8, 8), np.uint8), y=np.array(["1", "eleven", "2"]))
    values = {"bundle": bundle, "data": digit_image_npz, "missing": tmp_path / "nothing", "labels": labels}
    before = (bundle / "state.safetensors").read_bytes()
    done = js(*[a.format(**values) for a in args])
    assert done.returncode == 2
    assert_one_line_error(done, *fragments)
    assert (bundle / "state.safetensors").read_bytes() == before


# ---- the browser: Debian's Chromium, headless, driven by runtime/js/test/browser/run.mjs -----------------------------

def browser(*args, timeout: int = 1200):
    done = subprocess.run(["node", str(JS / "test" / "browser" / "run.mjs"), *map(str, args)], cwd=JS,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # Chromium
def test_browser_steps_match_the_python_runtime(js_runtime, bundle_factory, digit_image_npz, tmp_path):
    """20 steps, same batches: onnxruntime-web WebAssembly (1 and 2 threads) and WebGPU (SwiftShader's software
    adapter) against the Python runtime: head — every trained tensor within 1e-5 relative (WebGPU: 5e-5, measured
    2.4e-5 on the head's bias: the shader sums the batch in another order and AdamW divides by √v); full fine-tuning
    — the loss within 1e-3 relative at every step, on WebAssembly and WebGPU."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(digit_image_npz, data / "digits.npz")
    bundles = {preset: bundle_factory("tiny_cnn", preset, input_size=(16,)) for preset in ("head", "full")}
    for preset, bundle in bundles.items():
        shutil.copytree(bundle, data / preset)
    runs = [{"bundle": preset, "data": "digits.npz", "ep": [ep], "threads": threads, "wantParams": True}
            for preset, ep, threads in (("head", "wasm", 1), ("head", "wasm", 2), ("full", "wasm", 1),
                                        ("head", "webgpu", 1), ("full", "webgpu", 1))]
    results = browser("steps", data, json.dumps(runs))
    for run, result in zip(runs, results):
        assert "error" not in result, (run, result)
        losses, _, params = python_steps(data / run["bundle"], data / "digits.npz", 20, 8)
        assert np.allclose(result["losses"], losses, rtol=1e-3, atol=0), run
        if run["bundle"] == "head":
            manifest = json.loads((data / "head" / "manifest.json").read_text())
            got = np.asarray(result["params"])
            for p in manifest["portable"]["layout"]:
                part = slice(p["offset"], p["offset"] + p["size"])
                error = np.linalg.norm(got[part] - params[part]) / np.linalg.norm(params[part])
                assert error <= (5e-5 if run["ep"] == ["webgpu"] else 1e-5), (run, p["name"], error)


@pytest.mark.slow  # Chromium
def test_browser_feature_cache_reuses_only_authenticated_features(js_runtime, bundle_factory, digit_image_npz,
                                                                  tmp_path):
    """A split bundle trained three times in Chromium from fresh installs, with the IndexedDB feature store: the
    prefix runs on every sample the first time, on none the second, on the one entry altered in IndexedDB (its MAC
    kept) the third; all three train to the same parameters, and those are the Python runtime's."""
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(digit_image_npz, data / "digits.npz")
    shutil.copytree(bundle_factory("tiny_cnn", "head", input_size=(16,)), data / "head")
    python, = copies(data / "head", tmp_path, "python")
    assert run_cli("train", python, digit_image_npz, "--epochs", "2", "--batch-size", "8", "--seed", "1",
                   "--quiet").returncode == 0
    done = subprocess.run(["node", str(JS / "test" / "browser" / "run.mjs"), "cache", str(data),
                           json.dumps({"bundleUrl": "/data/head/", "dataUrl": "/data/digits.npz"})], cwd=JS,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    first, second, third = json.loads(done.stdout.strip().splitlines()[-1])
    samples = len(np.load(digit_image_npz)["y"])
    assert [first["prefixSamples"], second["prefixSamples"], third["prefixSamples"]] == [samples, 0, 1]
    assert first["params"] == second["params"] == third["params"]
    want = state_tensors(python)
    got = np.asarray(first["params"], np.float32)
    manifest = json.loads((python / "manifest.json").read_text())
    for p in manifest["portable"]["layout"]:
        np.testing.assert_allclose(got[p["offset"]:p["offset"] + p["size"]], want[f"params/{p['name']}"].ravel(),
                                   rtol=1e-5, atol=1e-6, err_msg=p["name"])


@pytest.mark.slow  # Chromium and a real MobileNetV2
def test_browser_demo_trains_persists_and_shows_progress(js_runtime, tmp_path):
    """The demo page end to end in headless Chromium: MobileNetV2 (ImageNet, 96 px, head) learns 4 textures from
    32 photos added with the file pickers, held-out accuracy rises, the page stays responsive (training runs in a
    worker), a reload continues from the state in OPFS; the screenshot shows the progress bar full."""
    from PIL import Image

    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.demo import TEXTURES, write_texture_dataset
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    write_texture_dataset(tmp_path / "textures", train_per_class=8, test_per_class=8)
    bundle = export_bundle(ExportOptions(out=tmp_path / "bundle", backbone="mobilenet_v2", weights="imagenet",
                                         head=HeadRequest(labels=TEXTURES), input_size=(96,), validate=False)).out
    shot = tmp_path / "demo.png"
    page = browser("demo", bundle, tmp_path / "textures" / "train", tmp_path / "textures" / "test", shot)
    assert "error" not in page, page
    assert int(page["trained"]) >= 20 and page["progress"][0] == page["progress"][1]
    assert float(page["accuracyAfter"]) > float(page["accuracyBefore"]) and float(page["accuracyAfter"]) >= 0.75
    assert page["ticks"] > 5, "the page's timers ran while the worker trained"
    assert "continuing from the state saved on this device" in page["afterReload"]["status"]
    assert int(page["afterReload"]["savedSteps"]) == int(page["trained"])
    image = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    blue = (image[..., 2] > 180) & (image[..., 0] < 80)  # the filled progress bar and the loss curve
    assert blue.sum() > 5000, "the screenshot shows the progress UI"


@pytest.mark.slow  # CLI subprocesses; CI runs it
def test_readme_node_example_runs(js_runtime, bundle_factory, digit_images, tmp_path):
    """The README's "In an app" Node example, as written, on a bundle and image folders named as it names them."""
    import re

    readme = (JS.parents[1] / "README.md").read_text()
    section = readme.split("## In an app", 1)[1]
    example = re.search(r"```js\n(.*?)```", section, re.S).group(1)
    shutil.copytree(bundle_factory("tiny_cnn", "full", input_size=(16,)), tmp_path / "photos-bundle")
    for part, chosen in (("train", slice(0, 12)), ("test", slice(12, 16))):
        for folder in sorted(digit_images.iterdir()):
            (tmp_path / "photos" / part / folder.name).mkdir(parents=True)
            for file in sorted(folder.iterdir())[chosen]:
                shutil.copy(file, tmp_path / "photos" / part / folder.name / file.name)
    script = JS / f"scratch-readme-{os.getpid()}.mjs"  # inside the package: `@edgeadapt/runtime` resolves to itself
    script.write_text(example)
    try:
        done = subprocess.run(["node", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    finally:
        script.unlink()
    assert done.returncode == 0, done.stderr
    assert re.match(r"completed \d+ steps; held-out accuracy 0?\.?\d*", done.stdout), done.stdout


def test_react_native_app_type_checks_against_onnxruntime_react_native(js_runtime):
    """React Native cannot run here: an app's use of the core and the React Native adapter (test/react-native/app.ts)
    compiles against onnxruntime-react-native's own type definitions."""
    done = subprocess.run(["npx", "tsc", "-p", "test/react-native/tsconfig.json"], cwd=JS, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
