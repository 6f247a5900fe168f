"""Real data available offline for the benchmarks, the tests and the README's examples: Debian's
`dataset-fashion-mnist` (IDX files), `wordnet-base` (noun glosses by category, as text) and `espeak-ng` (spoken
keywords, as speech). `python benchmarks/datasets.py wordnet|keywords --out … --test …` writes them as files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_LABELS = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle-boot")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist_train() -> tuple[np.ndarray, np.ndarray]:
    """The train split's 60,000 images (uint8, 28×28) and labels. `apt-get install dataset-fashion-mnist`."""
    if not FASHION_MNIST.is_dir():
        raise SystemExit("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    return _idx(FASHION_MNIST / "train-images-idx3-ubyte.gz"), _idx(FASHION_MNIST / "train-labels-idx1-ubyte.gz")


def fashion_subsets(train: int, held_out: int, seed: int = 0, per_class: bool = False):
    """Disjoint seeded subsets of the train split: (x_train, y_train), (x_test, y_test); labels as names."""
    images, labels = fashion_mnist_train()
    order = np.random.default_rng(seed).permutation(len(labels))
    if per_class:  # `train` images of each class
        picked = np.concatenate([order[labels[order] == c][:train] for c in range(10)])
    else:
        picked = order[:train]
    rest = np.setdiff1d(order, picked, assume_unique=False)
    test = np.random.default_rng(seed + 1).permutation(rest)[:held_out]
    names = np.array(FASHION_LABELS)
    return (images[picked], names[labels[picked]]), (images[test], names[labels[test]])


# ---- text: WordNet noun glosses by lexicographer category (Debian's wordnet-base) ------------------------------

WORDNET_NOUNS = Path("/usr/share/wordnet/data.noun")
# lexicographer file numbers of 8 noun categories (lexnames(5WN)): an intent-like 8-way text task
WORDNET_CATEGORIES = {4: "act", 5: "animal", 13: "food", 15: "location", 18: "person", 20: "plant", 22: "process",
                      27: "substance"}


def wordnet_glosses(categories: dict[int, str] = WORDNET_CATEGORIES) -> dict[str, list[str]]:
    """Each category's noun glosses (the definition before any example), longer than 10 characters, in file
    order. `apt-get install wordnet-base`."""
    if not WORDNET_NOUNS.is_file():
        raise SystemExit("WordNet is missing: apt-get install wordnet-base")
    out: dict[str, list[str]] = {name: [] for name in categories.values()}
    for line in WORDNET_NOUNS.read_text(encoding="latin-1").splitlines():
        if line.startswith(" ") or "|" not in line:
            continue
        category = int(line.split(" ", 3)[1])
        gloss = line.split("|", 1)[1].split(";")[0].strip()
        if category in categories and len(gloss) > 10:
            out[categories[category]].append(gloss)
    return out


def all_wordnet_texts() -> list[str]:
    """Every gloss of every part of speech, examples included (the tokenizer's comparison corpus)."""
    texts = []
    for part in ("noun", "verb", "adj", "adv"):
        for line in Path(f"/usr/share/wordnet/data.{part}").read_text(encoding="latin-1").splitlines():
            if not line.startswith(" ") and "|" in line:
                texts.append(line.split("|", 1)[1].strip())
    return texts


def write_text_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


# ---- speech: spoken keywords synthesised by espeak-ng, voices split between training and held-out ----------------

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")  # Speech Commands' ten
TRAIN_VOICES = tuple(f"{accent}+{variant}" for accent in ("en-gb", "en-us", "en-gb-scotland")
                     for variant in ("m1", "m2", "m3", "f1", "f2", "f3"))
HELD_OUT_VOICES = tuple(f"{accent}+{variant}" for accent in ("en-gb-x-rp", "en-029", "en-gb-x-gbclan")
                        for variant in ("m4", "m5", "f4", "f5"))
SPEEDS, PITCHES = (130, 160, 190), (30, 50, 70)


def speak(word: str, voice: str, speed: int, pitch: int, path: Path) -> Path:
    """One WAV file of `word` spoken by espeak-ng (22,050 Hz, 16-bit). `apt-get install espeak-ng`."""
    import subprocess

    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), word],
                   check=True, capture_output=True)
    return path


def in_noise(path: Path, rng: np.random.Generator, snr_db: tuple[float, float] = (0.0, 15.0),
             lead_s: tuple[float, float] = (0.0, 0.6)) -> Path:
    """Rewrite a WAV as a harder recording: a random lead-in of silence and white noise at a random SNR."""
    import wave

    with wave.open(str(path), "rb") as reader:
        rate, raw = reader.getframerate(), reader.readframes(reader.getnframes())
    speech = np.frombuffer(raw, "<i2").astype(np.float64) / 32768
    signal = np.concatenate([np.zeros(int(rng.uniform(*lead_s) * rate)), speech])
    power = max(float(np.mean(speech ** 2)), 1e-10)
    noisy = signal + rng.normal(0, np.sqrt(power / 10 ** (rng.uniform(*snr_db) / 10)), len(signal))
    with wave.open(str(path), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes((np.clip(noisy, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def spoken_keywords(root: Path, voices: tuple[str, ...], per_class: int | None = None, seed: int = 0,
                    words: tuple[str, ...] = KEYWORDS, noisy: bool = True) -> Path:
    """A folder of class subfolders of .wav: every word by every voice at each speed and pitch (or `per_class`
    of those combinations, seeded), each at a random offset in white noise of 0-15 dB SNR (`noisy`)."""
    rng = np.random.default_rng(seed)
    combos = [(v, s, p) for v in voices for s in SPEEDS for p in PITCHES]
    for word in words:
        picked = combos if per_class is None else [combos[i] for i in
                                                   rng.permutation(len(combos))[:per_class]]
        for voice, speed, pitch in picked:
            path = speak(word, voice, speed, pitch, root / word / f"{voice.replace('+', '_')}-{speed}-{pitch}.wav")
            if noisy:
                in_noise(path, rng)
    return root


def main() -> None:
    """Write the offline text or speech data in the formats `edgeadapt train` reads (used by the README's
    examples): `wordnet` → CSV files of text,label; `keywords` → folders of class subfolders of .wav files."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("kind", choices=("wordnet", "keywords"))
    parser.add_argument("--per-class", type=int, default=32, help="training samples per class")
    parser.add_argument("--held-out", type=int, default=25, help="held-out samples per class")
    parser.add_argument("--out", type=Path, required=True, help="the training CSV, or the training folder")
    parser.add_argument("--test", type=Path, required=True, help="the held-out CSV, or the held-out folder")
    args = parser.parse_args()
    if args.kind == "wordnet":
        glosses = wordnet_glosses()
        rng = np.random.default_rng(0)
        picked = {name: [texts[i] for i in rng.permutation(len(texts))] for name, texts in sorted(glosses.items())}
        write_text_csv(args.out, [(t, n) for n, texts in picked.items() for t in texts[:args.per_class]])
        write_text_csv(args.test, [(t, n) for n, texts in picked.items()
                                   for t in texts[args.per_class:args.per_class + args.held_out]])
        labels = sorted(glosses)
    else:
        spoken_keywords(args.out, TRAIN_VOICES, args.per_class)
        spoken_keywords(args.test, HELD_OUT_VOICES, args.held_out, seed=1)
        labels = sorted(KEYWORDS)
    (args.out.parent / "labels.txt").write_text("\n".join(labels) + "\n")
    print(f"wrote {args.out}, {args.test} and {args.out.parent / 'labels.txt'}")


if __name__ == "__main__":
    main()
