/**
 * The text front end, as the Python runtime's (runtime/text.py): BERT's WordPiece tokenizer over the bundle's
 * vocabulary — the ids Hugging Face `tokenizers` gives for BertNormalizer + BertPreTokenizer + WordPiece
 * (`[CLS] text [SEP]`, truncated to the input length, right-padded). Steps: special tokens found in the raw text;
 * clean (drop NUL, U+FFFD and control characters; whitespace to spaces); spaces around CJK ideographs; NFD and drop
 * non-spacing marks, then lowercase per character (both when `lowercase`); split on whitespace; isolate punctuation;
 * greedy longest-match WordPiece with `##`. Strings are walked by code point, as Python and Rust do.
 */

import {BundleError} from "./errors.js";
import type {TokenSpec} from "./manifest.js";

const SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
// Rust's char::is_whitespace minus the control characters cleaning drops first
const WHITESPACE = new Set([..." \t\n\r\u00a0\u1680\u2028\u2029\u202f\u205f\u3000",
  ...Array.from({length: 11}, (_, i) => String.fromCodePoint(0x2000 + i))]);
const CJK: [number, number][] = [[0x4E00, 0x9FFF], [0x3400, 0x4DBF], [0x20000, 0x2A6DF], [0x2A700, 0x2B73F],
  [0x2B740, 0x2B81F], [0x2B820, 0x2CEAF], [0xF900, 0xFAFF], [0x2F800, 0x2FA1F]];
const OTHER = /^\p{C}$/u, PUNCTUATION = /^\p{P}$/u, NONSPACING_MARK = /^\p{Mn}$/u;

const isControl = (c: string) => c !== "\t" && c !== "\n" && c !== "\r" && OTHER.test(c);
const isCjk = (c: string) => CJK.some(([low, high]) => c.codePointAt(0)! >= low && c.codePointAt(0)! <= high);

function isPunctuation(c: string): boolean {
  const code = c.codePointAt(0)!;
  return (code >= 33 && code <= 47) || (code >= 58 && code <= 64) || (code >= 91 && code <= 96) ||
    (code >= 123 && code <= 126) || PUNCTUATION.test(c);
}

export function normalize(text: string, lowercase = true): string {
  const chars: string[] = [];
  for (const c of text) {
    if (c === "\0" || c === "\ufffd" || isControl(c)) continue;
    if (WHITESPACE.has(c)) chars.push(" ");
    else if (isCjk(c)) chars.push(" ", c, " ");
    else chars.push(c);
  }
  let out = chars.join("");
  if (lowercase) {
    out = Array.from(out.normalize("NFD")).filter((c) => !NONSPACING_MARK.test(c)).join("");
    out = Array.from(out, (c) => c.toLowerCase()).join("");
  }
  return out;
}

export function preTokenize(text: string): string[] {
  const words: string[] = [];
  for (const chunk of Array.from(text, (c) => (WHITESPACE.has(c) ? " " : c)).join("").split(" ")) {
    const chars = Array.from(chunk);
    let start = 0;
    chars.forEach((c, i) => {
      if (!isPunctuation(c)) return;
      if (i > start) words.push(chars.slice(start, i).join(""));
      words.push(c);
      start = i + 1;
    });
    if (start < chars.length) words.push(chars.slice(start).join(""));
  }
  return words;
}

/** A vocabulary file's tokens: one per line, its line number its id (a final newline ends the last line). */
export function vocabularyLines(text: string): string[] {
  const lines = text.split("\n");
  if (lines.length && lines[lines.length - 1] === "") lines.pop();
  return lines.map((t) => t.replace(/\r+$/, ""));
}

export class WordPiece {
  private readonly ids = new Map<string, number>();
  private readonly specials: RegExp | null;

  constructor(vocab: string[], readonly spec: TokenSpec) {
    vocab.forEach((token, i) => { if (!this.ids.has(token)) this.ids.set(token, i); });
    const present = SPECIAL_TOKENS.filter((t) => this.ids.has(t)).sort((a, b) => b.length - a.length);
    this.specials = present.length
      ? new RegExp(`(${present.map((t) => t.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("|")})`) : null;
  }

  static fromText(text: string, spec: TokenSpec): WordPiece {
    const vocab = vocabularyLines(text);
    if (vocab.length !== spec.vocab_size) {
      throw new BundleError(`${spec.vocab_file} holds ${vocab.length} tokens, the manifest says ${spec.vocab_size}; ` +
        "re-export the bundle.");
    }
    return new WordPiece(vocab, spec);
  }

  pieces(word: string): number[] {
    const chars = Array.from(word);
    if (chars.length > this.spec.max_chars_per_word) return [this.spec.unk_id];
    const out: number[] = [];
    let start = 0;
    while (start < chars.length) {
      let end = chars.length;
      for (; end > start; end--) {
        const piece = (start === 0 ? "" : "##") + chars.slice(start, end).join("");
        const id = this.ids.get(piece);
        if (id !== undefined) {
          out.push(id);
          break;
        }
      }
      if (end === start) return [this.spec.unk_id];
      start = end;
    }
    return out;
  }

  /** The ids of `text` without [CLS]/[SEP] or truncation. */
  tokenize(text: string): number[] {
    const segments = this.specials ? text.split(this.specials) : [text];
    const ids: number[] = [];
    segments.forEach((segment, i) => {
      if (i % 2 === 1) ids.push(this.ids.get(segment)!); // a special token written in the text
      else for (const word of preTokenize(normalize(segment, this.spec.lowercase))) ids.push(...this.pieces(word));
    });
    return ids;
  }

  /** [N × max_length] ids, right-padded: the model's input for `texts`. */
  encodeBatch(texts: string[]): Int32Array {
    const {max_length: length, pad_id, cls_id, sep_id} = this.spec;
    const out = new Int32Array(texts.length * length).fill(pad_id);
    texts.forEach((text, row) => {
      out.set([cls_id, ...this.tokenize(text).slice(0, length - 2), sep_id], row * length);
    });
    return out;
  }
}
