/**
 * JSON text as Python's `json.dumps` writes it (", " and ": " separators unless compact, ASCII only, floats in
 * `repr` form, `Infinity`/`NaN`), so the progress the two runtimes store in a state file reads the same and a run
 * moves between them. Numbers are floats when their key is in `floatKeys` (Python's type is lost in JSON).
 */

export type Json = null | boolean | number | string | Json[] | {[key: string]: Json};

/** `repr(float(x))`: the shortest round-trip digits, exponent form below 1e-4 and from 1e16. */
export function pyFloat(x: number): string {
  if (Number.isNaN(x)) return "NaN";
  if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, exponentText] = x.toExponential().split("e");
  const exponent = Number(exponentText);
  if (exponent < -4 || exponent >= 16) {
    const sign = exponent < 0 ? "-" : "+";
    return `${mantissa}e${sign}${String(Math.abs(exponent)).padStart(2, "0")}`;
  }
  const text = String(x);
  return /[.e]/.test(text) ? text : `${text}.0`;
}

function pyString(text: string): string {
  return JSON.stringify(text).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

export function pyDumps(value: Json, options: {floatKeys?: ReadonlySet<string>; compact?: boolean; sortKeys?: boolean} = {},
                        key = ""): string {
  const [item, pair] = options.compact ? [",", ":"] : [", ", ": "];
  if (value === null) return "null";
  if (typeof value === "boolean") return value ? "true" : "false";
  if (typeof value === "number") {
    return options.floatKeys?.has(key) || !Number.isInteger(value) ? pyFloat(value) : String(value);
  }
  if (typeof value === "string") return pyString(value);
  if (Array.isArray(value)) return `[${value.map((v) => pyDumps(v, options, key)).join(item)}]`;
  const keys = Object.keys(value);
  if (options.sortKeys) keys.sort();
  return `{${keys.map((k) => `${pyString(k)}${pair}${pyDumps(value[k], options, k)}`).join(item)}}`;
}

/** JSON.parse that also reads Python's `Infinity`, `-Infinity` and `NaN` tokens. */
export function pyLoads(text: string): Json {
  const marked = text.replace(/("(?:[^"\\]|\\.)*")|-?Infinity|NaN/g, (match, quoted) =>
    quoted ?? `"\\u0000${match}"`);
  return JSON.parse(marked, (_key, v) =>
    typeof v === "string" && v.startsWith("\u0000") ? Number(v.slice(1)) : v) as Json;
}
