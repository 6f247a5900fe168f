"""The tiny models' WordPiece vocabulary: BERT's special tokens, characters (whole-word and `##` continuation) and
a few common English pieces, so every ASCII text tokenizes without [UNK] and the tests need no download."""

from __future__ import annotations

import string
from functools import lru_cache

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "for", "on", "that", "with", "as", "an", "or", "by",
          "be", "this", "from", "at", "not", "are", "was", "one", "you", "me", "my", "no", "yes", "play", "stop",
          "call", "set", "turn", "what", "time", "music", "light", "alarm", "weather")
_SUFFIXES = ("s", "ed", "ing", "ly", "er", "es", "ion", "al", "ic", "ment", "ness", "able")


@lru_cache(maxsize=1)
def tiny_vocabulary() -> tuple[str, ...]:
    chars = string.ascii_lowercase + string.digits + string.punctuation
    pieces = [*SPECIAL, *chars, *(f"##{c}" for c in string.ascii_lowercase + string.digits), *_WORDS,
              *(f"##{s}" for s in _SUFFIXES)]
    return tuple(dict.fromkeys(pieces))


def tiny_vocabulary_text() -> str:
    return "\n".join(tiny_vocabulary()) + "\n"
