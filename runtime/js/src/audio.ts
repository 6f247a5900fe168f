/**
 * The audio front end, as the Python runtime's (runtime/audio.py), in float64: PCM WAV decoded and mixed to mono,
 * Fourier-resampled to the model's rate (scipy.signal.resample's method), padded or cut to the clip length, and
 * Whisper's log-mel features (power STFT with a periodic Hann window, centred with reflection; Slaney mel filters;
 * log10 floored at 1e-10, clamped to 8 below the clip's maximum, (x + 4) / 4). FFTs of any length: radix 2, and
 * Bluestein's chirp-z for the others (400-sample frames, clips of any rate).
 */

import {DataError} from "./errors.js";
import type {AudioSpec} from "./manifest.js";

export const MAX_WAV_SECONDS = 600;

/** (mono samples in [-1, 1], sample rate) of a PCM WAV file's bytes; DataError naming `where` otherwise. */
export function decodeWav(bytes: Uint8Array, where: string): {samples: Float64Array; rate: number} {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const tag = (o: number) => String.fromCharCode(...bytes.subarray(o, o + 4));
  const refuse = (why: string) => new DataError(`${where} is not a readable PCM WAV file (${why}); convert it to 16-bit PCM WAV.`);
  if (bytes.length < 12 || tag(0) !== "RIFF" || tag(8) !== "WAVE") throw refuse("no RIFF/WAVE header");
  let format: {channels: number; rate: number; width: number} | null = null;
  for (let o = 12; o + 8 <= bytes.length;) {
    const id = tag(o), length = view.getUint32(o + 4, true), body = o + 8;
    if (id === "fmt ") {
      if (length < 16 || body + 16 > bytes.length) throw refuse("a short fmt chunk");
      const code = view.getUint16(body, true);
      if (code !== 1 && code !== 0xfffe) throw refuse(`format code ${code}, not PCM`);
      format = {channels: view.getUint16(body + 2, true), rate: view.getUint32(body + 4, true),
        width: view.getUint16(body + 14, true) / 8};
    } else if (id === "data") {
      if (!format) throw refuse("data before fmt");
      const {channels, rate, width} = format;
      if (rate < 1 || channels < 1) throw new DataError(`${where} declares ${rate} Hz and ${channels} channels; convert it to 16-bit PCM WAV.`);
      if (![1, 2, 3, 4].includes(width)) throw new DataError(`${where} has ${8 * width}-bit samples; convert it to 16-bit PCM WAV.`);
      const frames = Math.floor(Math.min(length, bytes.length - body) / (width * channels));
      if (frames > MAX_WAV_SECONDS * rate) {
        throw new DataError(`${where} is ${(frames / rate).toFixed(0)} s long, more than ${MAX_WAV_SECONDS} s; cut it.`);
      }
      const samples = new Float64Array(frames);
      for (let f = 0; f < frames; f++) {
        let sum = 0;
        for (let c = 0; c < channels; c++) sum += pcm(view, body + (f * channels + c) * width, width);
        samples[f] = sum / channels;
      }
      return {samples, rate};
    }
    o = body + length + (length % 2);
  }
  throw refuse(format ? "no data chunk" : "no fmt chunk");
}

function pcm(view: DataView, o: number, width: number): number {
  if (width === 1) return (view.getUint8(o) - 128) / 128; // 8-bit WAV is unsigned
  if (width === 2) return view.getInt16(o, true) / 32768;
  if (width === 3) return ((view.getUint8(o) | (view.getUint8(o + 1) << 8) | (view.getInt8(o + 2) << 16))) / (1 << 23);
  return view.getInt32(o, true) / 2 ** 31;
}

// ---- FFT --------------------------------------------------------------------------------------------------------

/** In-place radix-2 FFT of (re, im), length a power of two; `inverse` without the 1/n. */
function radix2(re: Float64Array, im: Float64Array, inverse: boolean): void {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let size = 2; size <= n; size <<= 1) {
    const angle = (inverse ? 2 : -2) * Math.PI / size, half = size >> 1;
    for (let k = 0; k < half; k++) {
      const wr = Math.cos(angle * k), wi = Math.sin(angle * k);
      for (let start = 0; start < n; start += size) {
        const a = start + k, b = a + half;
        const tr = re[b] * wr - im[b] * wi, ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr; im[b] = im[a] - ti;
        re[a] += tr; im[a] += ti;
      }
    }
  }
}

/** The DFT of (re, im) of any length (inverse: without the 1/n), by Bluestein's chirp-z where not a power of 2. */
export function fft(re: Float64Array, im: Float64Array, inverse = false): [Float64Array, Float64Array] {
  const n = re.length;
  if (n === 0 || (n & (n - 1)) === 0) {
    const [r, i] = [re.slice(), im.slice()];
    radix2(r, i, inverse);
    return [r, i];
  }
  let m = 1;
  while (m < 2 * n - 1) m <<= 1;
  const sign = inverse ? 1 : -1;
  const cr = new Float64Array(n), ci = new Float64Array(n); // chirp e^{sign·iπk²/n}
  for (let k = 0; k < n; k++) {
    const angle = sign * Math.PI * ((k * k) % (2 * n)) / n;
    cr[k] = Math.cos(angle); ci[k] = Math.sin(angle);
  }
  const ar = new Float64Array(m), ai = new Float64Array(m), br = new Float64Array(m), bi = new Float64Array(m);
  for (let k = 0; k < n; k++) {
    ar[k] = re[k] * cr[k] - im[k] * ci[k];
    ai[k] = re[k] * ci[k] + im[k] * cr[k];
  }
  br[0] = cr[0]; bi[0] = -ci[0];
  for (let k = 1; k < n; k++) {
    br[k] = br[m - k] = cr[k];
    bi[k] = bi[m - k] = -ci[k];
  }
  radix2(ar, ai, false);
  radix2(br, bi, false);
  for (let k = 0; k < m; k++) {
    const r = ar[k] * br[k] - ai[k] * bi[k];
    ai[k] = ar[k] * bi[k] + ai[k] * br[k];
    ar[k] = r;
  }
  radix2(ar, ai, true);
  const outR = new Float64Array(n), outI = new Float64Array(n);
  for (let k = 0; k < n; k++) {
    const r = ar[k] / m, i = ai[k] / m;
    outR[k] = r * cr[k] - i * ci[k];
    outI[k] = r * ci[k] + i * cr[k];
  }
  return [outR, outI];
}

// ---- resampling, clip length, log-mel ----------------------------------------------------------------------------

/** Fourier resampling to `target` Hz: the spectrum cut or zero-padded, an even length's Nyquist bin split or merged. */
export function resample(samples: Float64Array, rate: number, target: number): Float64Array {
  if (rate === target || samples.length === 0) return samples;
  const size = samples.length, count = Math.max(1, Math.round(size * target / rate));
  const [sr, si] = fft(samples, new Float64Array(size));
  const kept = Math.min(count, size), half = Math.floor(count / 2);
  const outR = new Float64Array(count), outI = new Float64Array(count);
  for (let k = 0; k <= Math.floor(kept / 2); k++) {
    outR[k] = sr[k];
    outI[k] = si[k];
  }
  if (kept % 2 === 0) {
    const scale = count < size ? 2 : count > size ? 0.5 : 1;
    outR[kept / 2] *= scale;
    outI[kept / 2] *= scale;
  }
  // the real signal's full spectrum from its half (numpy's irfft drops the imaginary parts of DC and Nyquist)
  outI[0] = 0;
  if (count % 2 === 0) outI[half] = 0;
  for (let k = 1; k < count - half; k++) {
    outR[count - k] = outR[k];
    outI[count - k] = -outI[k];
  }
  const [back] = fft(outR, outI, true);
  return back.map((v) => v / size);
}

export function fitLength(samples: Float64Array, length: number): Float64Array {
  if (samples.length >= length) return samples.subarray(0, length);
  const out = new Float64Array(length);
  out.set(samples);
  return out;
}

const hzToMel = (hz: number) => (hz >= 1000 ? 15 + Math.log(Math.max(hz, 1e-10) / 1000) * (27 / Math.log(6.4)) : 3 * hz / 200);
const melToHz = (mel: number) => (mel >= 15 ? 1000 * Math.exp(Math.log(6.4) / 27 * (mel - 15)) : 200 * mel / 3);

/** [n_mels][n_fft/2 + 1] triangular filters on Slaney's scale from 0 Hz to Nyquist, area-normalised. */
export function melFilters(rate: number, nFft: number, nMels: number): Float64Array[] {
  const top = hzToMel(rate / 2);
  const edges = Array.from({length: nMels + 2}, (_, i) => melToHz(top * i / (nMels + 1)));
  const bins = Array.from({length: nFft / 2 + 1}, (_, i) => Math.floor(rate / 2) * i / (nFft / 2));
  return Array.from({length: nMels}, (_, m) => {
    const norm = 2 / (edges[m + 2] - edges[m]);
    return Float64Array.from(bins, (f) => Math.max(0, Math.min((f - edges[m]) / (edges[m + 1] - edges[m]),
      (edges[m + 2] - f) / (edges[m + 2] - edges[m + 1]))) * norm);
  });
}

/** Whisper's features of one clip of `spec.samples` samples: [n_mels × frames], float32, mel-major. */
export function logMel(samples: Float64Array, spec: AudioSpec): Float32Array {
  const {n_fft: nFft, hop_length: hop, n_mels: nMels} = spec, pad = nFft / 2;
  const padded = new Float64Array(samples.length + 2 * pad); // reflection, as numpy's "reflect"
  padded.set(samples, pad);
  for (let i = 1; i <= pad; i++) {
    padded[pad - i] = samples[Math.min(i, samples.length - 1)];
    padded[pad + samples.length - 1 + i] = samples[Math.max(samples.length - 1 - i, 0)];
  }
  const count = 1 + Math.floor((padded.length - nFft) / hop), frames = count - 1; // the last frame is dropped
  const window = Float64Array.from({length: nFft}, (_, i) => 0.5 - 0.5 * Math.cos(2 * Math.PI * i / nFft));
  const filters = melFilters(spec.sample_rate, nFft, nMels), bins = nFft / 2 + 1;
  const logs = new Float64Array(nMels * frames);
  const power = new Float64Array(bins), zeros = new Float64Array(nFft);
  let top = -Infinity;
  for (let t = 0; t < frames; t++) {
    const frame = Float64Array.from({length: nFft}, (_, i) => padded[t * hop + i] * window[i]);
    const [re, im] = fft(frame, zeros);
    for (let k = 0; k < bins; k++) power[k] = re[k] * re[k] + im[k] * im[k];
    for (let m = 0; m < nMels; m++) {
      let sum = 0;
      for (let k = 0; k < bins; k++) sum += filters[m][k] * power[k];
      const value = Math.log10(Math.max(sum, 1e-10));
      logs[m * frames + t] = value;
      top = Math.max(top, value);
    }
  }
  return Float32Array.from(logs, (v) => (Math.max(v, top - 8) + 4) / 4);
}

/** Raw mono samples at `rate` → the model's input for one clip. */
export function clipFeatures(samples: Float64Array, rate: number, spec: AudioSpec): Float32Array {
  return logMel(fitLength(resample(samples, rate, spec.sample_rate), spec.samples), spec);
}

/** A WAV file's bytes → the model's input; DataError for an empty or non-finite clip. */
export function wavFeatures(bytes: Uint8Array, spec: AudioSpec, where: string): Float32Array {
  const {samples, rate} = decodeWav(bytes, where);
  if (samples.length === 0) throw new DataError(`${where} holds no samples; record it again or remove it.`);
  return clipFeatures(samples, rate, spec);
}
