/**
 * NumPy's `default_rng(seed).permutation(n)`, exactly: SeedSequence entropy mixing, the PCG64 (XSL-RR 128/64)
 * bit generator and Generator.shuffle's bounded draws. The Python runtime orders batches and splits validation data
 * with it, so the same seed gives the same batches in both runtimes (a bundle can move between them mid-run).
 */

const MASK32 = 0xffffffffn;
const MASK64 = (1n << 64n) - 1n;
const MASK128 = (1n << 128n) - 1n;
const MULTIPLIER = (2549297995355413924n << 64n) + 4865540595714422341n;
const POOL_SIZE = 4;
const INIT_A = 0x43b0d7e5, MULT_A = 0x931e8875, INIT_B = 0x8b51f9dd, MULT_B = 0x58f38ded;
const MIX_MULT_L = 0xca01f9dd, MIX_MULT_R = 0x4973f715;

const mul32 = (a: number, b: number): number => Math.imul(a, b) >>> 0;

/** An entropy value as NumPy's SeedSequence sees it: non-negative integers, each split into 32-bit words. */
function entropyWords(seed: number | bigint | (number | bigint)[]): number[] {
  const values = Array.isArray(seed) ? seed : [seed];
  const words: number[] = [];
  for (const value of values) {
    let n = BigInt(value);
    if (n < 0n) throw new RangeError("a seed must be a non-negative integer");
    if (n === 0n) words.push(0);
    for (; n > 0n; n >>= 32n) words.push(Number(n & MASK32));
  }
  return words;
}

function seedPool(entropy: number[]): number[] {
  let hashConst = INIT_A;
  const hashmix = (value: number): number => {
    value = (value ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_A);
    value = mul32(value, hashConst);
    return (value ^ (value >>> 16)) >>> 0;
  };
  const mix = (x: number, y: number): number => {
    const result = (mul32(MIX_MULT_L, x) - mul32(MIX_MULT_R, y)) >>> 0;
    return (result ^ (result >>> 16)) >>> 0;
  };
  const pool = Array.from({length: POOL_SIZE}, (_, i) => hashmix(i < entropy.length ? entropy[i] : 0));
  for (let src = 0; src < POOL_SIZE; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) {
      if (src !== dst) pool[dst] = mix(pool[dst], hashmix(pool[src]));
    }
  }
  for (let src = POOL_SIZE; src < entropy.length; src++) {
    for (let dst = 0; dst < POOL_SIZE; dst++) pool[dst] = mix(pool[dst], hashmix(entropy[src]));
  }
  return pool;
}

/** SeedSequence.generate_state(n, uint64): 2n words cycled from the pool, paired little-endian. */
function generateState64(pool: number[], count: number): bigint[] {
  let hashConst = INIT_B;
  const words: number[] = [];
  for (let i = 0; i < 2 * count; i++) {
    let value = (pool[i % pool.length] ^ hashConst) >>> 0;
    hashConst = mul32(hashConst, MULT_B);
    value = mul32(value, hashConst);
    words.push((value ^ (value >>> 16)) >>> 0);
  }
  return Array.from({length: count}, (_, i) => BigInt(words[2 * i]) | (BigInt(words[2 * i + 1]) << 32n));
}

export class Pcg64 {
  private state = 0n;
  private readonly increment: bigint;
  private spare: number | null = null; // NumPy hands out the high half of a 64-bit draw as the next 32-bit one

  constructor(seed: number | bigint | (number | bigint)[]) {
    const [s0, s1, q0, q1] = generateState64(seedPool(entropyWords(seed)), 4);
    this.increment = (((q0 << 64n) | q1) << 1n | 1n) & MASK128;
    this.advance();
    this.state = (this.state + ((s0 << 64n) | s1)) & MASK128;
    this.advance();
  }

  private advance(): void {
    this.state = (this.state * MULTIPLIER + this.increment) & MASK128;
  }

  next64(): bigint {
    this.advance();
    const xored = ((this.state >> 64n) ^ this.state) & MASK64;
    const rotation = this.state >> 122n;
    return ((xored >> rotation) | (xored << ((64n - rotation) & 63n))) & MASK64;
  }

  next32(): number {
    if (this.spare !== null) {
      const value = this.spare;
      this.spare = null;
      return value;
    }
    const draw = this.next64();
    this.spare = Number(draw >> 32n);
    return Number(draw & MASK32);
  }

  /** A uniform integer in [0, max] by masked rejection (NumPy's random_interval). */
  interval(max: number): number {
    if (max === 0) return 0;
    let mask = max;
    for (let shift = 1; shift <= 16; shift <<= 1) mask |= mask >>> shift;
    mask >>>= 0;
    if (max <= 0xffffffff) {
      for (;;) {
        const value = (this.next32() & mask) >>> 0;
        if (value <= max) return value;
      }
    }
    throw new RangeError("permutations longer than 2^32 are not supported");
  }
}

/** `numpy.random.default_rng(seed).permutation(n)`. */
export function permutation(seed: number | bigint | (number | bigint)[], n: number): number[] {
  const rng = new Pcg64(seed);
  const order = Array.from({length: n}, (_, i) => i);
  for (let i = n - 1; i >= 1; i--) {
    const j = rng.interval(i);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}
