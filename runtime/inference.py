"""`evaluate` (metrics on labelled data) and `predict` (top-k labels for inputs) over a bundle's current state."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.data import IMAGE_SUFFIXES, Dataset, decode_image, load_dataset, preprocess
from edgeadapt.runtime.engines import open_engine
from edgeadapt.runtime.errors import DataError
from edgeadapt.runtime.metrics import Metrics, dummy_targets, evaluate_arrays
from edgeadapt.runtime.state import TrainState


def _open(bundle: Bundle | str | Path) -> Bundle:
    return bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)


def evaluation_engine(bundle: Bundle, engine: str = "auto", device: str = "cpu", threads: int | None = None,
                      state: TrainState | None = None):
    """An engine over the whole graph, holding `state` (default: the bundle's current trained state)."""
    opened = open_engine(bundle, bundle.graphs(split=False), engine, device, threads, training=False)
    opened.load(state or bundle.load_state())
    return opened


def evaluate(bundle: Bundle | str | Path, data: Dataset | str | Path, batch_size: int = 64,
             threads: int | None = None, engine: str = "auto", device: str = "cpu") -> Metrics:
    bundle = _open(bundle)
    dataset = data if isinstance(data, Dataset) else load_dataset(data, bundle)
    metrics = evaluate_arrays(evaluation_engine(bundle, engine, device, threads), dataset, bundle.manifest, batch_size)
    return dataclasses.replace(metrics, skipped=list(dataset.skipped))


@dataclass(frozen=True)
class Prediction:
    input: str
    top: list[dict]  # {"label", "index", "score"}; empty when the input could not be read
    error: str = ""  # why the input could not be read


def load_inputs(paths: list[str | Path], bundle: Bundle) -> tuple[list[str], np.ndarray, bool, list[Prediction]]:
    """Image files, folders of them (labelled in class subfolders or not: every image below, in name order), or
    .npz/.csv files whose rows are samples (text and speech bundles: `_text_or_audio_inputs`); returns (names, raw
    samples, is_image, unreadable images as error predictions). Data files must be readable as a whole."""
    spec = bundle.manifest.input
    if spec.kind in ("tokens", "audio"):
        return _text_or_audio_inputs(paths, bundle)
    names, samples, is_image, failed = [], [], spec.layout == "NCHW", []
    for path in _expanded(map(Path, paths)):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                samples.append(decode_image(path, spec.channels, tuple(spec.resize), spec.crop)[None])
            except Exception as exc:  # PIL's many error types for a broken image, OSError for a missing one
                failed.append(Prediction(str(path), [], f"cannot read image ({type(exc).__name__}: "
                                                        f"{str(exc)[:80]})"))
                continue
            names.append(str(path))
        else:
            data = load_dataset(path, bundle)
            samples.append(data.samples)
            names += data.names
            is_image = data.is_image
    if not paths:
        raise DataError("no input given; pass image files or .npz/.csv files.")
    if not samples:
        raise DataError(f"none of the {len(failed)} inputs can be read (first: {failed[0].input}: {failed[0].error});"
                        " give valid PNG or JPEG files.")
    return names, np.concatenate(samples), is_image, failed


def _text_or_audio_inputs(paths: list[str | Path], bundle: Bundle):
    """.txt files (one sample each), CSV/JSONL tables (labels optional) and folders of .txt files for text; .wav
    files and folders of them for speech; .npz of model inputs for both."""
    from edgeadapt.runtime import text_audio
    from edgeadapt.runtime.audio import AUDIO_SUFFIXES, load_clip

    spec = bundle.manifest.input
    is_text = spec.kind == "tokens"
    suffixes = text_audio.TEXT_SUFFIXES if is_text else AUDIO_SUFFIXES
    names, samples, failed, texts = [], [], [], []
    if not paths:
        raise DataError(f"no input given; pass {'.txt, .csv or .jsonl' if is_text else '.wav'} files or folders.")
    for path in map(Path, paths):
        if path.suffix == ".npz" or (is_text and path.suffix.lower() in text_audio.TABLE_SUFFIXES):
            if path.suffix == ".npz":
                data = load_dataset(path, bundle)
                samples.append(data.samples)
                names += data.names
            else:
                found, _, rows = text_audio.read_table(path, labelled=False)
                texts += found
                names += rows
            continue
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes) \
            if path.is_dir() else [path]
        for file in files:
            try:
                item = text_audio.read_text_file(file) if is_text else load_clip(file, spec.audio)[None]
            except (DataError, OSError) as exc:
                failed.append(Prediction(str(file), [], str(exc)))
                continue
            (texts if is_text else samples).append(item)
            names.append(str(file))
    if texts:
        samples.append(bundle.tokenizer().encode_batch(texts))
    if not samples:
        raise DataError(f"none of the {len(failed)} inputs can be read (first: {failed[0].input}: {failed[0].error})"
                        if failed else "the inputs hold no sample.")
    return names, np.concatenate(samples), False, failed


def _expanded(paths) -> list[Path]:
    """Folders become the image files below them."""
    files = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not images:
            raise DataError(f"folder {path} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); give image files, "
                            "a folder of them, or an .npz/.csv.")
        files += images
    return files


def logits_for(bundle: Bundle, x: np.ndarray, engine: str = "auto", device: str = "cpu",
               threads: int | None = None) -> np.ndarray:
    opened = evaluation_engine(bundle, engine, device, threads)
    return opened.eval_step(x, dummy_targets(bundle.manifest, len(x)))[1]


def predict(bundle: Bundle | str | Path, inputs: list[str | Path], top_k: int = 5, engine: str = "auto",
            device: str = "cpu") -> list[Prediction]:
    bundle = _open(bundle)
    names, samples, is_image, failed = load_inputs(inputs, bundle)
    logits = logits_for(bundle, preprocess(samples, bundle.manifest, is_image), engine, device)
    scores = _scores(logits, bundle.manifest.loss)
    k = min(top_k, scores.shape[1])
    return [Prediction(name, [{"label": bundle.manifest.labels[i], "index": int(i), "score": float(row[i])}
                              for i in np.argsort(-row)[:k]]) for name, row in zip(names, scores)] + failed


def _scores(logits: np.ndarray, loss: str) -> np.ndarray:
    if loss == "cross_entropy":
        shifted = np.exp(logits - logits.max(1, keepdims=True))
        return shifted / shifted.sum(1, keepdims=True)
    if loss == "bce_with_logits":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits
