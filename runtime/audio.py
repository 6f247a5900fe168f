"""Audio front end on the device, numpy and the standard library only: WAV files read with `wave`, mixed to mono,
resampled to the model's rate (FFT resampling), padded or cut to the clip length, and turned into Whisper's log-mel
features (what `transformers`' WhisperFeatureExtractor computes for the same clip length, to float rounding)."""

from __future__ import annotations

import wave
from functools import lru_cache
from pathlib import Path

import numpy as np

from edgeadapt.runtime.errors import DataError
from edgeadapt.runtime.manifest import AudioSpec

AUDIO_SUFFIXES = {".wav", ".wave"}
MAX_WAV_SECONDS = 600  # longer files are refused before they are decoded


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """(float64 mono samples in [-1, 1], sample rate) of a PCM WAV file; DataError naming the file otherwise."""
    try:
        with wave.open(str(path), "rb") as reader:
            rate, width, channels, count = (reader.getframerate(), reader.getsampwidth(), reader.getnchannels(),
                                            reader.getnframes())
            if count > MAX_WAV_SECONDS * max(rate, 1):
                raise DataError(f"{path} is {count / rate:.0f} s long, more than {MAX_WAV_SECONDS} s; cut it.")
            raw = reader.readframes(count)
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"{path} is not a readable PCM WAV file ({exc}); convert it to 16-bit PCM WAV.") from None
    if rate < 1 or channels < 1:
        raise DataError(f"{path} declares {rate} Hz and {channels} channels; convert it to 16-bit PCM WAV.")
    return _pcm_to_float(raw, width, path).reshape(-1, channels).mean(axis=1), rate


def _pcm_to_float(raw: bytes, width: int, path: Path) -> np.ndarray:
    if width == 1:  # 8-bit WAV is unsigned
        return (np.frombuffer(raw, np.uint8).astype(np.float64) - 128.0) / 128.0
    if width == 3:  # 24-bit: widen to 32 with the sign in the top byte
        data = np.frombuffer(raw[:len(raw) // 3 * 3], np.uint8).reshape(-1, 3)
        as_int = (data[:, 0].astype(np.int32) | (data[:, 1].astype(np.int32) << 8) |
                  (data[:, 2].astype(np.int8).astype(np.int32) << 16))
        return as_int / float(1 << 23)
    if width in (2, 4):
        dtype = np.dtype(f"<i{width}")
        return np.frombuffer(raw[:len(raw) // width * width], dtype).astype(np.float64) / float(1 << (8 * width - 1))
    raise DataError(f"{path} has {8 * width}-bit samples; convert it to 16-bit PCM WAV.")


def resample(samples: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Fourier resampling to `target` Hz (the method of scipy.signal.resample: the spectrum cut or zero-padded,
    the Nyquist bin of an even length split or merged)."""
    if rate == target or len(samples) == 0:
        return samples
    size = len(samples)
    count = max(1, int(round(size * target / rate)))
    spectrum = np.fft.rfft(samples)
    kept = min(count, size)
    out = np.zeros(count // 2 + 1, np.complex128)
    out[:kept // 2 + 1] = spectrum[:kept // 2 + 1]
    if kept % 2 == 0:
        out[kept // 2] *= 2.0 if count < size else 0.5 if count > size else 1.0
    return np.fft.irfft(out, count) * (count / size)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Cut to `length` or pad with silence at the end."""
    return samples[:length] if len(samples) >= length else np.pad(samples, (0, length - len(samples)))


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear to 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log_part, 3.0 * hz / 200.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (mel - 15.0)), 200.0 * mel / 3.0)


@lru_cache(maxsize=8)
def mel_filters(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_mels, n_fft/2 + 1] triangular filters on Slaney's scale from 0 Hz to Nyquist, area-normalised."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sample_rate / 2), n_mels + 2))
    bins = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    rising = (bins[None, :] - edges[:-2, None]) / np.diff(edges)[:-1, None]
    falling = (edges[2:, None] - bins[None, :]) / np.diff(edges)[1:, None]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[:, None]


@lru_cache(maxsize=8)
def _hann(size: int) -> np.ndarray:
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(size) / size)  # periodic


def log_mel(samples: np.ndarray, spec: AudioSpec) -> np.ndarray:
    """Whisper's features of one clip of `spec.samples` samples: power STFT (Hann, centred with reflection), mel
    filters, log10 floored at 1e-10, clamped to 8 below the clip's maximum, scaled as (x + 4) / 4 → [n_mels, frames]."""
    n_fft, hop = spec.n_fft, spec.hop_length
    padded = np.pad(np.asarray(samples, np.float64), n_fft // 2, mode="reflect")
    count = 1 + (len(padded) - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(padded, (count, n_fft), (padded.strides[0] * hop, padded.strides[0]))
    power = np.abs(np.fft.rfft(frames * _hann(n_fft), axis=1)) ** 2
    mel = mel_filters(spec.sample_rate, n_fft, spec.n_mels) @ power.T
    logs = np.log10(np.maximum(mel, 1e-10))[:, :-1]
    logs = np.maximum(logs, logs.max() - 8.0)
    return ((logs + 4.0) / 4.0).astype(np.float32)


def clip_features(samples: np.ndarray, rate: int, spec: AudioSpec) -> np.ndarray:
    """Raw mono samples at `rate` → the model's input for one clip."""
    return log_mel(fit_length(resample(samples, rate, spec.sample_rate), spec.samples), spec)


def load_clip(path: Path, spec: AudioSpec) -> np.ndarray:
    samples, rate = read_wav(path)
    if len(samples) == 0:
        raise DataError(f"{path} holds no samples; record it again or remove it.")
    if not np.isfinite(samples).all():
        raise DataError(f"{path} holds samples that are not finite; re-encode it.")
    return clip_features(samples, rate, spec)
