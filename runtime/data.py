"""Local data for training on the device: image folders, `.npz` (x, y) and CSV rows, preprocessed as the manifest
says; text and audio for token and speech bundles (runtime/text_audio.py). Images are decoded once and kept as
uint8, normalisation (and light augmentation) happens per batch; texts become token ids and clips log-mel features
once, at load."""

from __future__ import annotations

import csv
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeadapt.runtime.errors import DataError
from edgeadapt.runtime.manifest import Manifest

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MAX_IMAGE_PIXELS = 64_000_000  # larger images (files or arrays) are refused as decompression bombs
MAX_ARRAY_BYTES = 4 << 30  # an .npz array's decoded size, read from its header before it is decoded


@dataclass
class Dataset:
    samples: np.ndarray  # uint8 [N, H, W, C] for images, float32 [N, ...] otherwise
    targets: np.ndarray  # int64 [N] class indices, or float32 [N, K]
    is_image: bool
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    names: list[str] = field(default_factory=list)  # per-sample source (file path or row)
    features: bool = False  # samples are already model inputs (e.g. a split bundle's prefix outputs)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, index: np.ndarray) -> "Dataset":
        names = [self.names[i] for i in index] if self.names else []
        return Dataset(self.samples[index], self.targets[index], self.is_image, self.skipped, names, self.features)


def _manifest(source) -> Manifest:
    """Loaders take a Bundle (text needs its `tokenizer()`) or, for other inputs, a bare Manifest."""
    return getattr(source, "manifest", source)


def load_dataset(path: str | Path, source, max_bad_fraction: float = 0.1) -> Dataset:
    """Load a folder of class subfolders, an .npz with x and y, or a CSV (features…, label); text and audio
    bundles read their formats (runtime/text_audio.py). `source`: the Bundle, or its Manifest for non-text data."""
    path = Path(path)
    manifest = _manifest(source)
    if not path.exists():
        raise DataError(f"data {path} does not exist; give {FORMATS[manifest.input.kind]}.")
    if manifest.input.kind == "tokens":
        data = load_text_dataset(path, source, max_bad_fraction)
    elif manifest.input.kind == "audio":
        data = load_audio_dataset(path, manifest, max_bad_fraction)
    elif path.is_dir():
        data = load_image_folder(path, manifest, max_bad_fraction)
    elif path.suffix == ".npz":
        data = load_npz(path, manifest)
    elif path.suffix == ".csv":
        data = load_csv(path, manifest)
    else:
        raise DataError(f"data {path} is not a folder, .npz or .csv; give one of those.")
    if len(data) == 0:
        raise DataError(f"data {path} holds no usable sample; add samples (see `edgeadapt train --help`).")
    return data


FORMATS = {"image": "a folder of class subfolders of images, an .npz or a .csv file",
           "features": "an .npz or a .csv file of feature rows",
           "tokens": "a CSV or JSONL of text,label, a folder of class subfolders of .txt files, or an .npz of ids",
           "audio": "a folder of class subfolders of .wav files, or an .npz of log-mel features"}


def load_text_dataset(path: Path, bundle, max_bad_fraction: float = 0.1) -> Dataset:
    from edgeadapt.runtime import text_audio

    manifest = _manifest(bundle)
    spec = manifest.input.tokens
    if path.suffix == ".npz":
        arrays = read_npz(path, ("x", "y"))
        ids = text_audio.check_token_ids(arrays["x"], spec, str(path))
        return Dataset(ids, _targets(arrays["y"], manifest, str(path)), False, [],
                       [f"{path}[{i}]" for i in range(len(ids))])
    if path.is_dir():
        texts, labels, names, skipped = text_audio.text_folder(path)
        text_audio.check_bad_fraction(skipped, len(texts) + len(skipped), "text files", path, max_bad_fraction)
    elif path.suffix.lower() in text_audio.TABLE_SUFFIXES:
        (texts, labels, names), skipped = text_audio.read_table(path), []
    else:
        raise DataError(f"data {path} is not {FORMATS['tokens']}; give one of those.")
    ids = bundle.tokenizer().encode_batch(texts)
    return Dataset(ids, encode_labels(labels, manifest, str(path)), False, skipped, names)


def load_audio_dataset(path: Path, manifest: Manifest, max_bad_fraction: float = 0.1) -> Dataset:
    from edgeadapt.runtime import text_audio
    from edgeadapt.runtime.audio import AUDIO_SUFFIXES

    if path.suffix == ".npz":
        return load_npz(path, manifest)
    if not path.is_dir():
        raise DataError(f"data {path} is not {FORMATS['audio']}; give one of those.")
    files = text_audio.class_files(path, AUDIO_SUFFIXES)
    features, kept, skipped = text_audio.audio_files([f for f, _ in files], manifest.input.audio)
    text_audio.check_bad_fraction(skipped, len(files), "audio files", path, max_bad_fraction)
    samples = np.stack(features) if features else np.zeros((0, *manifest.input.shape[1:]), np.float32)
    targets = encode_labels([files[i][1] for i in kept], manifest, str(path)) if kept else np.zeros(0, np.int64)
    return Dataset(samples, targets, False, skipped, [str(files[i][0]) for i in kept])


# ---- labels -------------------------------------------------------------------------------------------------

def encode_labels(values: list, manifest: Manifest, where: str) -> np.ndarray:
    """Map label names (or class indices) through the manifest's labels; an unknown one is an error naming it."""
    index = {name: i for i, name in enumerate(manifest.labels)}
    out = []
    for value in values:
        key = str(value).strip()
        if key in index:
            out.append(index[key])
        elif key.lstrip("-").isdigit() and 0 <= int(key) < len(manifest.labels):
            out.append(int(key))
        else:
            shown = ", ".join(manifest.labels[:8]) + (" …" if len(manifest.labels) > 8 else "")
            raise DataError(f"label '{key}' in {where} is not among the bundle's labels ({shown}); rename it or "
                            "re-export with --labels that include it.")
    return np.asarray(out, dtype=np.int64)


# ---- images -------------------------------------------------------------------------------------------------

def _to_uint8(image):
    """16-bit and float modes down to 8 bits, so every image reaches the model on the same scale."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode == "F":
        raise ValueError("floating-point images are ambiguous in scale; save them as 8- or 16-bit")
    return image


def decode_image(file: Path, channels: str, size: tuple[int, int], crop: float) -> np.ndarray:
    """Decode one image file (refusing decompression bombs) and prepare it for the model."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(file) as image:
            image.load()
            return prepare_image(image, channels, size, crop)


def prepare_image(image, channels: str, size: tuple[int, int], crop: float) -> np.ndarray:
    """Convert to the manifest's channels, resize the shorter side to size/crop, centre-crop to size (uint8 HWC)."""
    from PIL import Image

    image = _to_uint8(image)
    image = image.convert("RGBA").convert(channels) if image.mode in ("P", "PA") else image.convert(channels)
    height, width = size
    scale = max(height / crop / image.height, width / crop / image.width)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                           Image.BILINEAR)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    array = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _image_files(root: Path) -> list[tuple[Path, str]]:
    from edgeadapt.runtime.text_audio import class_files

    return class_files(root, IMAGE_SUFFIXES)


def load_image_folder(root: Path, manifest: Manifest, max_bad_fraction: float = 0.1) -> Dataset:
    spec = manifest.input
    if spec.layout != "NCHW":
        raise DataError(f"{root} is an image folder but the bundle takes {spec.layout} rows; give a .csv or .npz.")
    files = _image_files(root)
    targets = encode_labels([label for _, label in files], manifest, str(root)) if files else np.zeros(0, np.int64)
    images, kept, skipped = [], [], []
    for i, (file, _) in enumerate(files):
        try:
            images.append(decode_image(file, spec.channels, tuple(spec.resize), spec.crop))
            kept.append(i)
        except Exception as exc:  # PIL raises many types for broken files; all mean "skip this file"
            skipped.append((str(file), f"{type(exc).__name__}: {str(exc)[:80]}"))
    if files and len(skipped) > max_bad_fraction * len(files):
        raise DataError(f"{len(skipped)} of {len(files)} images in {root} cannot be read (first: {skipped[0][0]}: "
                        f"{skipped[0][1]}); fix or remove them (limit {max_bad_fraction:.0%}).")
    height, width = spec.resize
    samples = np.stack(images) if images else np.zeros((0, height, width, len(spec.channels)), np.uint8)
    return Dataset(samples, targets[kept], True, skipped, [str(files[i][0]) for i in kept])


def load_unlabeled(path: str | Path, source, max_bad_fraction: float = 0.1) -> Dataset:
    """Samples without labels (AdaBN): every image under a folder (class subfolders or not), an .npz's `x`, or a
    labelled .csv; targets are zeros."""
    path = Path(path)
    manifest = _manifest(source)
    if manifest.input.kind in ("tokens", "audio"):
        return load_dataset(path, source, max_bad_fraction)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(path).parts))
        spec = manifest.input
        images, skipped = [], []
        for file in files:
            try:
                images.append(decode_image(file, spec.channels, tuple(spec.resize), spec.crop))
            except Exception as exc:  # PIL raises many types for broken files; all mean "skip this file"
                skipped.append((str(file), f"{type(exc).__name__}: {str(exc)[:80]}"))
        if not images or len(skipped) > max_bad_fraction * len(files):
            raise DataError(f"{path} holds {len(images)} readable images of {len(files)}; give a folder of images.")
        return Dataset(np.stack(images), np.zeros(len(images), np.int64), True, skipped)
    if path.suffix == ".npz":
        samples, is_image = _samples(read_npz(path, ("x",))["x"], manifest, str(path))
        return Dataset(samples, np.zeros(len(samples), np.int64), is_image)
    return load_dataset(path, manifest, max_bad_fraction)


# ---- arrays (npz, csv) ----------------------------------------------------------------------------------------

def _check_finite(x: np.ndarray, where: str) -> None:
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0][0])
        raise DataError(f"{where} has NaN or infinite values (first in sample {bad}); clean or drop those samples.")


def _targets(y: np.ndarray, manifest: Manifest, where: str) -> np.ndarray:
    if manifest.loss == "cross_entropy":
        if y.ndim != 1:
            raise DataError(f"{where}: y must be one label per sample, got shape {y.shape}.")
        return encode_labels(y.tolist(), manifest, where)
    y = np.asarray(y, dtype=np.float32).reshape(len(y), -1)
    _check_finite(y, where)
    if y.shape[1] != manifest.num_outputs:
        raise DataError(f"{where}: y has {y.shape[1]} columns per sample, the bundle predicts {manifest.num_outputs}.")
    return y


def _samples(x: np.ndarray, manifest: Manifest, where: str) -> tuple[np.ndarray, bool]:
    """Image-like uint8 arrays take the image path; anything else must already have the model's input shape."""
    spec, want = manifest.input, tuple(manifest.input.shape[1:])
    if x.ndim == 0:
        raise DataError(f"{where}: x is a single number (0-d); give one sample per row.")
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{where}: x has dtype {x.dtype}; give numbers (uint8 images or float features).")
    if spec.layout == "NCHW" and x.dtype == np.uint8 and x.ndim in (3, 4):
        images = x[..., None] if x.ndim == 3 else x
        if images.shape[-1] not in (1, 3, 4):
            raise DataError(f"{where}: image array has {images.shape[-1]} channels; give 1 (gray), 3 or 4.")
        return _resize_array(images, manifest), True
    if tuple(x.shape[1:]) != want:
        raise DataError(f"{where}: x has sample shape {tuple(x.shape[1:])}, the bundle expects {want} "
                        "(or uint8 images N×H×W[×C]); reshape the data.")
    x = x.astype(np.float32)
    _check_finite(x, where)
    return x, False


def _resize_array(images: np.ndarray, manifest: Manifest) -> np.ndarray:
    from PIL import Image

    spec = manifest.input
    return np.stack([prepare_image(Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image),
                                   spec.channels, tuple(spec.resize), spec.crop) for image in images])


def read_npz(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `names` of an .npz, each bounded from its header before it is decoded (no pickles)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
            missing = [n for n in names if n not in members]
            if missing:
                raise DataError(f"{path} must hold arrays named {' and '.join(names)}, found {sorted(members)}; save "
                                "it with numpy.savez(path, x=..., y=...).")
            for name in names:
                _check_npy_header(archive, members[name], path, name)
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in names}
    except DataError:
        raise
    except Exception as exc:  # zipfile/pickle/format errors from a bad file
        raise DataError(f"{path} is not a readable .npz without pickles ({type(exc).__name__}); save it with "
                        "numpy.savez(path, x=..., y=...).") from None


def _check_npy_header(archive: zipfile.ZipFile, member: str, path: Path, name: str) -> None:
    with archive.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(fh)
    if dtype.hasobject:
        raise DataError(f"{path}: {name} holds Python objects (pickles); save numbers only.")
    size = dtype.itemsize * math.prod(shape)
    if size > MAX_ARRAY_BYTES:
        raise DataError(f"{path}: {name} of shape {shape} would take {size / 2**30:.1f} GiB decoded, over the "
                        f"{MAX_ARRAY_BYTES >> 30} GiB limit; split the data into smaller files.")
    if dtype == np.uint8 and len(shape) in (3, 4) and shape[1] * shape[2] > MAX_IMAGE_PIXELS:
        raise DataError(f"{path}: {name} holds {shape[1]}×{shape[2]} images, over {MAX_IMAGE_PIXELS:,} pixels "
                        "each (a decompression bomb?); resize them first.")


def load_npz(path: Path, manifest: Manifest) -> Dataset:
    arrays = read_npz(path, ("x", "y"))
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{path}: x and y must hold one entry per sample, got shapes {x.shape} and {y.shape}.")
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}; they must match.")
    samples, is_image = _samples(x, manifest, str(path))
    return Dataset(samples, _targets(y, manifest, str(path)), is_image, [], [f"{path}[{i}]" for i in range(len(x))])


def load_csv(path: Path, manifest: Manifest) -> Dataset:
    """Rows of `features…, label` (classification) or `features…, target…` (regression); a header is optional."""
    try:
        rows = [r for r in csv.reader(path.read_text(encoding="utf-8-sig").splitlines()) if r]  # a BOM is no data
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save the CSV as UTF-8.") from None
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]
    width = int(np.prod(manifest.input.shape[1:]))
    n_targets = 1 if manifest.loss == "cross_entropy" else manifest.num_outputs
    features, labels = [], []
    for line, row in enumerate(rows, start=1):
        if len(row) != width + n_targets:
            raise DataError(f"{path} row {line} has {len(row)} columns, expected {width} features + {n_targets} "
                            "target(s); fix the row.")
        try:
            features.append([float(v) for v in row[:width]])
        except ValueError:
            raise DataError(f"{path} row {line} has a non-numeric feature; features must be numbers.") from None
        if manifest.loss == "cross_entropy":
            labels.append(row[width])
            continue
        try:
            labels.append([float(v) for v in row[width:]])
        except ValueError:
            raise DataError(f"{path} row {line} has a non-numeric target; {manifest.loss} targets must be "
                            "numbers.") from None
    x = np.asarray(features, dtype=np.float32).reshape(-1, *manifest.input.shape[1:])
    _check_finite(x, str(path))
    y = _targets(np.asarray(labels) if manifest.loss == "cross_entropy" else np.asarray(labels, float), manifest,
                 str(path))
    return Dataset(x, y, False, [], [f"{path}:{i + 1}" for i in range(len(x))])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---- batches --------------------------------------------------------------------------------------------------

def preprocess(samples: np.ndarray, manifest: Manifest, is_image: bool,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 NHWC images → normalised float32 NCHW (with flips/shifts when `rng` is given); rows → (x−mean)/std;
    token ids as they are."""
    spec = manifest.input
    if spec.kind == "tokens":
        return np.ascontiguousarray(samples, np.int64)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)
    if not is_image:
        shape = (1, -1) + (1,) * (samples.ndim - 2) if len(mean) > 1 and samples.ndim > 2 else (1, -1)
        return ((samples - mean.reshape(shape)) / std.reshape(shape)).astype(np.float32) if len(mean) > 1 \
            else ((samples - mean[0]) / std[0]).astype(np.float32)
    images = augment(samples, rng) if rng is not None else samples
    x = images.astype(np.float32) / 255.0
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def as_model_input(x: np.ndarray) -> np.ndarray:
    """A batch as the graphs take it: token ids stay int64, everything else is contiguous float32."""
    return np.ascontiguousarray(x, np.int64 if np.issubdtype(np.asarray(x).dtype, np.integer) else np.float32)


def batch_inputs(data: Dataset, index, manifest: Manifest, rng: np.random.Generator | None = None) -> np.ndarray:
    """The model inputs for `data.samples[index]`."""
    if data.features:
        return np.ascontiguousarray(data.samples[index], dtype=np.float32)
    return preprocess(data.samples[index], manifest, data.is_image, rng)


def augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Light augmentation: random horizontal flip and a random shift of up to 1/8 of the size (edge padding)."""
    out = np.empty_like(images)
    height, width = images.shape[1:3]
    pad_h, pad_w = height // 8, width // 8
    for i, image in enumerate(images):
        if rng.random() < 0.5:
            image = image[:, ::-1]
        padded = np.pad(image, ((pad_h, pad_h), (pad_w, pad_w), (0, 0)), mode="edge")
        top, left = rng.integers(0, 2 * pad_h + 1), rng.integers(0, 2 * pad_w + 1)
        out[i] = padded[top:top + height, left:left + width]
    return out


def split(data: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Seeded split into train and validation; no validation set when the fraction or the data is too small."""
    count = int(round(len(data) * val_fraction))
    if count < 1 or len(data) - count < 1:
        return data, None
    order = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(order[count:])), data.subset(np.sort(order[:count]))
