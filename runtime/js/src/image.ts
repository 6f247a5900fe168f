/**
 * Images as the Python runtime prepares them (`runtime/data.py` prepare_image, on Pillow), from decoded RGBA
 * pixels: RGB or ITU-R 601 luma, the shorter side resized to size/crop with Pillow's BILINEAR resampling (its
 * antialiasing triangle filter, 22-bit fixed-point coefficients, horizontal pass then vertical), an H×W centre crop.
 * The result is uint8 HWC, the form datasets keep; normalisation happens per batch.
 */

import type {InputSpec} from "./manifest.js";

export interface Pixels {
  width: number;
  height: number;
  /** RGBA, row-major, 4 bytes per pixel (ImageData.data, a decoded file, a camera frame) */
  data: Uint8Array | Uint8ClampedArray;
}

const PRECISION_BITS = 32 - 8 - 2;

/** Python's round(): halves to even. */
export function roundHalfEven(x: number): number {
  const floor = Math.floor(x), diff = x - floor;
  if (diff > 0.5) return floor + 1;
  if (diff < 0.5) return floor;
  return floor % 2 === 0 ? floor : floor + 1;
}

interface Coefficients {
  size: number; // taps per output pixel
  bounds: Int32Array; // per output pixel: first input index, count
  weights: Int32Array; // fixed point, size per output pixel
}

/** Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear (triangle) filter. */
function coefficients(inSize: number, outSize: number): Coefficients {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = 1.0 * filterScale;
  const size = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const weights = new Int32Array(outSize * size);
  const taps = new Float64Array(size);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const ss = 1.0 / filterScale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const t = Math.abs((x + xmin - center + 0.5) * ss);
      taps[x] = t < 1.0 ? 1.0 - t : 0.0;
      total += taps[x];
    }
    for (let x = 0; x < xmax; x++) {
      const w = total !== 0 ? taps[x] / total : taps[x];
      weights[xx * size + x] = Math.trunc(w < 0 ? -0.5 + w * (1 << PRECISION_BITS) : 0.5 + w * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return {size, bounds, weights};
}

const clip8 = (value: number): number => {
  const shifted = Math.floor(value / (1 << PRECISION_BITS));
  return shifted < 0 ? 0 : shifted > 255 ? 255 : shifted;
};

/** One resampling pass along x (horizontal) or y over a `channels`-plane uint8 image. */
function pass(src: Uint8Array, width: number, height: number, channels: number, outSize: number,
              horizontal: boolean): Uint8Array {
  const c = coefficients(horizontal ? width : height, outSize);
  const outWidth = horizontal ? outSize : width, outHeight = horizontal ? height : outSize;
  const out = new Uint8Array(outWidth * outHeight * channels);
  const half = 1 << (PRECISION_BITS - 1);
  for (let y = 0; y < outHeight; y++) {
    for (let x = 0; x < outWidth; x++) {
      const o = horizontal ? x : y;
      const first = c.bounds[o * 2], count = c.bounds[o * 2 + 1];
      for (let ch = 0; ch < channels; ch++) {
        let sum = half;
        for (let k = 0; k < count; k++) {
          const index = horizontal ? (y * width + first + k) : ((first + k) * width + x);
          sum += src[index * channels + ch] * c.weights[o * c.size + k];
        }
        out[(y * outWidth + x) * channels + ch] = clip8(sum);
      }
    }
  }
  return out;
}

/** Pillow's Image.resize(size, BILINEAR) of a uint8 image with `channels` planes interleaved. */
export function resizeBilinear(src: Uint8Array, width: number, height: number, channels: number, outWidth: number,
                               outHeight: number): Uint8Array {
  let image = src;
  if (outWidth !== width) image = pass(image, width, height, channels, outWidth, true);
  if (outHeight !== height) image = pass(image, outWidth, height, channels, outHeight, false);
  return image === src ? src.slice() : image;
}

/** RGBA → the manifest's channels (Pillow's convert: RGB drops alpha; L is ITU-R 601-2 luma, rounded). */
export function toChannels(pixels: Pixels, channels: string): Uint8Array {
  const count = pixels.width * pixels.height, data = pixels.data;
  if (data.length !== count * 4) throw new RangeError("pixels must be RGBA, 4 bytes per pixel");
  if (channels === "L") {
    const out = new Uint8Array(count);
    for (let i = 0; i < count; i++) {
      out[i] = (data[4 * i] * 19595 + data[4 * i + 1] * 38470 + data[4 * i + 2] * 7471 + 0x8000) >>> 16;
    }
    return out;
  }
  const out = new Uint8Array(count * 3);
  for (let i = 0; i < count; i++) {
    out[3 * i] = data[4 * i];
    out[3 * i + 1] = data[4 * i + 1];
    out[3 * i + 2] = data[4 * i + 2];
  }
  return out;
}

/** Decoded RGBA pixels → the model's uint8 HWC image: channels, shorter side to size/crop, centre crop. */
export function prepareImage(pixels: Pixels, spec: Pick<InputSpec, "channels" | "resize" | "crop">): Uint8Array {
  const channels = spec.channels === "L" ? 1 : 3;
  const [height, width] = spec.resize;
  const scale = Math.max(height / spec.crop / pixels.height, width / spec.crop / pixels.width);
  const newWidth = Math.max(width, roundHalfEven(pixels.width * scale));
  const newHeight = Math.max(height, roundHalfEven(pixels.height * scale));
  const resized = resizeBilinear(toChannels(pixels, spec.channels), pixels.width, pixels.height, channels, newWidth,
    newHeight);
  const left = Math.floor((newWidth - width) / 2), top = Math.floor((newHeight - height) / 2);
  const out = new Uint8Array(width * height * channels);
  for (let y = 0; y < height; y++) {
    const from = ((top + y) * newWidth + left) * channels;
    out.set(resized.subarray(from, from + width * channels), y * width * channels);
  }
  return out;
}
