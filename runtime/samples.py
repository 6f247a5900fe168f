"""Example model inputs that look like real data, for checks that run a graph without the user's data (export's
validation, deploy's check, shape probes): images and feature rows as standard-normal values (their preprocessed
distribution), text as token ids of real sentences, speech as log-mel features of synthesised voiced sounds."""

from __future__ import annotations

import numpy as np

from edgeadapt.runtime.manifest import InputSpec

SENTENCES = (
    "Turn on the kitchen lights.", "What's the weather like in Zürich tomorrow?", "play some jazz",
    "Set an alarm for 6:30 am, please!", "Remind me to call Mum when I get home.",
    "How many calories are in a banana?", "Stop.", "Send a message to Dr. Okafor: running 10 minutes late.",
    "Is the museum open on public holidays, and does it charge for children under twelve years of age?",
    "I'd like to book a table for four at 8 pm at the Italian place on Baker Street.",
    "translate 'good morning' into Japanese: おはようございます", "skip this song", "Wake me up in 20 minutes",
    "Add milk, eggs and two loaves of wholemeal bread to my shopping list.", "naïve café résumé",
    "Who won the 1998 World Cup?",
)


def example_batch(spec: InputSpec, batch: int, seed: int = 0, encode=None) -> np.ndarray:
    """`batch` model inputs of `spec`'s kind; `encode(texts) -> ids` is the bundle's tokenizer for text."""
    rng = np.random.default_rng(seed)
    if spec.kind == "tokens":
        if encode is None:
            raise ValueError("text inputs need the bundle's tokenizer")
        return encode([SENTENCES[i] for i in rng.integers(0, len(SENTENCES), batch)])
    if spec.kind == "audio":
        from edgeadapt.runtime.audio import log_mel

        return np.stack([log_mel(voiced_sound(spec.audio.samples, spec.audio.sample_rate, rng), spec.audio)
                         for _ in range(batch)])
    return rng.standard_normal([batch, *spec.shape[1:]]).astype(np.float32)


def voiced_sound(samples: int, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A vowel-like sound: a gliding pitch with harmonics under two formant peaks, an onset and decay, in noise,
    starting at a random point of the clip and shorter than it."""
    length = int(samples * rng.uniform(0.3, 0.8))
    t = np.arange(length) / rate
    pitch = rng.uniform(90, 260) * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    formants = rng.uniform(300, 900), rng.uniform(1000, 2600)
    voice = sum(np.sin(k * phase) * sum(np.exp(-((k * pitch - f) / 250.0) ** 2) for f in formants)
                for k in range(1, 30))
    voice *= np.minimum(1.0, t / 0.02) * np.exp(-t * rng.uniform(0.5, 3))
    out = rng.normal(0, 0.003, samples)
    start = int(rng.integers(0, samples - length + 1))
    out[start:start + length] += 0.3 * voice / max(np.abs(voice).max(), 1e-9)
    return out
