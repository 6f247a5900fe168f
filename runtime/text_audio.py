"""Text and audio datasets for token and speech bundles, turned into model inputs once at load time (token ids
through the bundle's tokenizer, log-mel features through runtime/audio.py):

- text: a CSV with `text` and `label` columns (a header names them; without one, the first two columns), JSONL
  lines `{"text": …, "label": …}`, or a folder of class subfolders of `.txt` files (one sample per file);
- audio: a folder of class subfolders of `.wav` files;
- both: an `.npz` whose `x` already holds model inputs (ids or features).

A file that cannot be read is skipped with its reason, like a broken image (up to `max_bad_fraction`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from edgeadapt.runtime.audio import load_clip
from edgeadapt.runtime.errors import DataError

TEXT_SUFFIXES = {".txt"}
TABLE_SUFFIXES = {".csv", ".jsonl"}
MAX_TEXT_CHARS = 100_000  # one sample; longer texts are cut (the model reads max_length tokens anyway)


def class_files(root: Path, suffixes: set[str]) -> list[tuple[Path, str]]:
    """(file, class folder name) for every file with one of `suffixes` in the class subfolders of `root` (hidden
    folders left out; a file that is not what its suffix says is the loader's to skip with its reason)."""
    files = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += [(f, folder.name) for f in sorted(folder.iterdir())
                  if f.is_file() and f.suffix.lower() in suffixes]
    return files


def read_text_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    if not text.strip():
        raise DataError(f"{path} holds no text; write the sample or remove the file.")
    return text[:MAX_TEXT_CHARS]


def read_table(path: Path, labelled: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(texts, labels, row names) of a CSV or JSONL file of samples; labels are "" where `labelled` is False."""
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; save it as UTF-8.") from None
    rows = _jsonl_rows(content, path) if path.suffix.lower() == ".jsonl" else _csv_rows(content, path)
    texts, labels, names = [], [], []
    for line, (text, label) in rows:
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {line} has no text; fill it in or drop the line.")
        if labelled and (label is None or str(label).strip() == ""):
            raise DataError(f"{path} line {line} has no label; give each sample a label.")
        texts.append(text[:MAX_TEXT_CHARS])
        labels.append("" if label is None else str(label))
        names.append(f"{path}:{line}")
    return texts, labels, names


def _csv_rows(content: str, path: Path) -> list[tuple[int, tuple]]:
    rows = [(i, r) for i, r in enumerate(csv.reader(content.splitlines()), start=1) if r]
    if not rows:
        return []
    header = [c.strip().lower() for c in rows[0][1]]
    text_col, label_col = (header.index("text"), header.index("label") if "label" in header else None) \
        if "text" in header else (0, 1)
    body = rows[1:] if "text" in header else rows
    out = []
    for line, row in body:
        if len(row) <= max(text_col, label_col or 0) and not (label_col is not None and len(row) == text_col + 1):
            raise DataError(f"{path} line {line} has {len(row)} columns; give text and label columns "
                            "(a header `text,label`).")
        label = row[label_col] if label_col is not None and label_col < len(row) else None
        out.append((line, (row[text_col], label)))
    return out


def _jsonl_rows(content: str, path: Path) -> list[tuple[int, tuple]]:
    out = []
    for line, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {line} is not JSON ({exc.msg}); write one object per line.") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f'{path} line {line} has no "text" field; write {{"text": ..., "label": ...}}.')
        out.append((line, (record["text"], record.get("label"))))
    return out


def text_folder(root: Path) -> tuple[list[str], list[str], list[str], list[tuple[str, str]]]:
    """(texts, labels, file names, skipped) of a folder of class subfolders of .txt files."""
    texts, labels, names, skipped = [], [], [], []
    for file, label in class_files(root, TEXT_SUFFIXES):
        try:
            texts.append(read_text_file(file))
        except (DataError, OSError) as exc:
            skipped.append((str(file), str(exc)))
            continue
        labels.append(label)
        names.append(str(file))
    return texts, labels, names, skipped


def audio_files(files: list[Path], spec) -> tuple[list[np.ndarray], list[int], list[tuple[str, str]]]:
    """Features of every readable clip, the indices kept, and (file, reason) for the rest."""
    features, kept, skipped = [], [], []
    for i, file in enumerate(files):
        try:
            features.append(load_clip(file, spec))
            kept.append(i)
        except (DataError, OSError) as exc:
            skipped.append((str(file), str(exc)))
    return features, kept, skipped


def check_bad_fraction(skipped: list, total: int, what: str, root: Path, limit: float) -> None:
    if total and len(skipped) > limit * total:
        raise DataError(f"{len(skipped)} of {total} {what} in {root} cannot be read (first: {skipped[0][0]}: "
                        f"{skipped[0][1]}); fix or remove them (limit {limit:.0%}).")


def check_token_ids(x: np.ndarray, spec, where: str) -> np.ndarray:
    """An .npz's `x` as token ids: integers of the input's length, inside the vocabulary."""
    if not np.issubdtype(x.dtype, np.integer) or x.ndim != 2 or x.shape[1] != spec.max_length:
        raise DataError(f"{where}: x must hold integer token ids of shape N×{spec.max_length}, got {x.dtype} "
                        f"{x.shape}; give texts (CSV, JSONL, .txt folders) or ids of that shape.")
    if x.size and (x.min() < 0 or x.max() >= spec.vocab_size):
        raise DataError(f"{where}: x holds token ids outside the vocabulary (0..{spec.vocab_size - 1}).")
    return x.astype(np.int64)
