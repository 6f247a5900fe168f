/**
 * User errors (one line: what, why, what to do) are `EdgeAdaptError`s; the CLI prints them and exits 2. Anything
 * else is an internal error. The same classes as the Python runtime's `runtime/errors.py`.
 */

export class EdgeAdaptError extends Error {
  readonly exitCode: number = 2;
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** The bundle is missing, malformed, modified or not trusted. */
export class BundleError extends EdgeAdaptError {}
/** The data cannot be used as given. */
export class DataError extends EdgeAdaptError {}
/** A setting or flag is wrong. */
export class ConfigError extends EdgeAdaptError {}
/** Training cannot go on (diverged twice, nothing to resume, another trainer holds the lock). */
export class TrainingError extends EdgeAdaptError {}
/** The engine refused or failed a graph. */
export class BackendError extends EdgeAdaptError {}
/** `AbortSignal` stopped the run; the last committed state is kept. */
export class CancelledError extends EdgeAdaptError {}
