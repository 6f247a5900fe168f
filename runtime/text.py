"""Text front end on the device, standard library only: BERT's WordPiece tokenizer over the bundle's vocabulary,
giving the ids Hugging Face `tokenizers` gives for a BertNormalizer + BertPreTokenizer + WordPiece tokenizer
(`[CLS] text [SEP]`, truncated to the input length, right-padded).

Steps, as `tokenizers` runs them: special tokens found in the raw text; clean (drop NUL, U+FFFD and control
characters; whitespace to spaces); spaces around CJK ideographs; NFD and drop non-spacing marks, then lowercase
(both when `lowercase`); split on whitespace; isolate punctuation; greedy longest-match WordPiece with `##`."""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import numpy as np

from edgeadapt.runtime.errors import BundleError, ConfigError
from edgeadapt.runtime.manifest import TokenSpec

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Rust's char::is_whitespace (the White_Space property) minus the control characters cleaning drops first
_WHITESPACE = frozenset(" \t\n\r\u00a0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200b))))
_CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
_CJK_LOWEST = min(low for low, _ in _CJK)  # most text never reaches the ranges' test


@lru_cache(maxsize=4096)
def _is_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


@lru_cache(maxsize=4096)
def _is_punctuation(char: str) -> bool:
    code = ord(char)
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or \
        unicodedata.category(char).startswith("P")


def _is_cjk(char: str) -> bool:
    code = ord(char)
    return code >= _CJK_LOWEST and any(low <= code <= high for low, high in _CJK)


def normalize(text: str, lowercase: bool = True) -> str:
    chars = []
    for char in text:
        if char in ("\0", "\ufffd") or _is_control(char):
            continue
        if char in _WHITESPACE:
            chars.append(" ")
        elif _is_cjk(char):
            chars.extend((" ", char, " "))
        else:
            chars.append(char)
    text = "".join(chars)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = "".join(c.lower() for c in text)  # per character, as Rust's char::to_lowercase (no final sigma)
    return text


def pre_tokenize(text: str) -> list[str]:
    words = []
    for chunk in "".join(" " if c in _WHITESPACE else c for c in text).split(" "):
        start = 0
        for i, char in enumerate(chunk):
            if _is_punctuation(char):
                words += [chunk[start:i], char] if i > start else [char]
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


class WordPiece:
    """Token ids for the manifest's `tokens` section and the bundle's vocabulary (one token per line)."""

    def __init__(self, vocab: list[str], spec: TokenSpec):
        self.spec = spec
        self.ids = {}
        for i, token in enumerate(vocab):
            self.ids.setdefault(token, i)
        specials = sorted((t for t in SPECIAL_TOKENS if t in self.ids), key=len, reverse=True)
        self._specials = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    @classmethod
    def from_text(cls, text: str, spec: TokenSpec) -> "WordPiece":
        vocab = vocabulary_lines(text)
        if len(vocab) != spec.vocab_size:
            raise BundleError(f"{spec.vocab_file} holds {len(vocab)} tokens, the manifest says {spec.vocab_size}; "
                              "re-export the bundle.")
        return cls(vocab, spec)

    def pieces(self, word: str) -> list[int]:
        if len(word) > self.spec.max_chars_per_word:
            return [self.spec.unk_id]
        out, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.ids:
                    out.append(self.ids[piece])
                    break
                end -= 1
            if end == start:
                return [self.spec.unk_id]
            start = end
        return out

    def tokenize(self, text: str) -> list[int]:
        """The ids of `text` without [CLS]/[SEP] or truncation."""
        segments = self._specials.split(text) if self._specials else [text]
        ids: list[int] = []
        for i, segment in enumerate(segments):
            if i % 2 == 1:  # a special token written in the text
                ids.append(self.ids[segment])
                continue
            for word in pre_tokenize(normalize(segment, self.spec.lowercase)):
                ids += self.pieces(word)
        return ids

    def encode(self, text: str) -> list[int]:
        body = self.tokenize(text)[:self.spec.max_length - 2]
        return [self.spec.cls_id, *body, self.spec.sep_id]

    def encode_batch(self, texts: list[str]) -> np.ndarray:
        """[N, max_length] int64 ids, right-padded."""
        out = np.full((len(texts), self.spec.max_length), self.spec.pad_id, np.int64)
        for row, text in enumerate(texts):
            ids = self.encode(text)
            out[row, :len(ids)] = ids
        return out


def vocabulary_lines(text: str) -> list[str]:
    """A vocabulary file's tokens: one per line, its line number its id (a final newline ends the last line)."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [t.rstrip("\r") for t in lines]


def token_spec(vocab: list[str], vocab_file: str, max_length: int, lowercase: bool = True) -> TokenSpec:
    """The manifest's tokens section for a BERT-style vocabulary."""
    ids = {token: i for i, token in reversed(list(enumerate(vocab)))}
    missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in ids]
    if missing:
        raise ConfigError(f"the vocabulary has no {missing[0]} token; give a BERT WordPiece vocabulary.")
    return TokenSpec(vocab_file, len(vocab), max_length, ids["[PAD]"], ids["[CLS]"], ids["[SEP]"], ids["[UNK]"],
                     lowercase)
