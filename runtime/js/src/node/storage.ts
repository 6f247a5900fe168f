/**
 * Node's platform adapter: a bundle folder on disk (plain files opened without following links, atomic replace by
 * temp file + fsync + rename + folder fsync, the training lock as the Python runtime writes it: a complete temp file
 * holding the pid, hard-linked into place) and the device key the Python runtime uses on this device
 * (`$EDGEADAPT_DEVICE_KEY`, else `~/.config/edgeadapt/device.key`), so both runtimes authenticate each other's state.
 */

import {constants, promises as fs} from "node:fs";
import {homedir} from "node:os";
import path from "node:path";
import {ConfigError, TrainingError, BundleError} from "../errors.js";
import type {BundleStorage, DeviceKeyStore} from "../platform.js";

const READ_FLAGS = constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK;
const MAX_PID = 1 << 22;

const alive = (pid: number): boolean => {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
};

async function fsyncPath(target: string, flags = constants.O_RDONLY): Promise<void> {
  const handle = await fs.open(target, flags);
  try {
    await handle.sync();
  } finally {
    await handle.close();
  }
}

export class FileStorage implements BundleStorage {
  constructor(readonly location: string) {}

  async read(name: string, limit: number): Promise<Uint8Array | null> {
    const file = path.join(this.location, name);
    let handle;
    try {
      handle = await fs.open(file, READ_FLAGS);
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === "ENOENT") return null;
      const why = code === "ELOOP" || code === "EMLINK" ? "a link" : code;
      throw new BundleError(`${file} cannot be read (${why}); a bundle holds plain files only: copy it again.`);
    }
    try {
      const info = await handle.stat();
      if (!info.isFile()) throw new BundleError(`${file} is not a regular file; a bundle holds plain files only: copy it again.`);
      if (info.size > limit) {
        throw new BundleError(`${file} has ${info.size} bytes, more than the ${limit} it may have; it was modified or ` +
          "corrupted: re-export the bundle or copy it again.");
      }
      const buffer = Buffer.alloc(info.size + 1);
      let filled = 0;
      for (;;) {
        const {bytesRead} = await handle.read(buffer, filled, buffer.length - filled, filled);
        if (!bytesRead) break;
        filled += bytesRead;
        if (filled > info.size) throw new BundleError(`${file} grew while read; copy the bundle again.`);
      }
      return new Uint8Array(buffer.buffer, buffer.byteOffset, filled).slice();
    } finally {
      await handle.close();
    }
  }

  async replace(name: string, data: Uint8Array): Promise<void> {
    const target = path.join(this.location, name);
    const temp = path.join(this.location, `.${name}.tmp-${process.pid}`);
    const handle = await fs.open(temp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o644);
    try {
      await handle.writeFile(data);
      await handle.sync();
    } finally {
      await handle.close();
    }
    await fs.rename(temp, target);
    await fsyncPath(this.location);
  }

  async append(name: string, text: string): Promise<void> {
    const file = path.join(this.location, name);
    let handle;
    try {
      handle = await fs.open(file, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT | constants.O_NOFOLLOW, 0o644);
      await handle.write(text);
      await handle.sync();
    } catch (error) {
      throw new TrainingError(`cannot append to ${file} (${(error as NodeJS.ErrnoException).code}); the state of this ` +
        "epoch is saved and holds its log line: free space and continue with --resume.");
    } finally {
      await handle?.close();
    }
  }

  async sweep(): Promise<void> {
    for (const entry of await fs.readdir(this.location)) {
      if (/^\..*\.tmp-\d+$/.test(entry)) await fs.rm(path.join(this.location, entry), {force: true});
    }
  }

  /** The lock's pid; null when there is none; TrainingError when it holds anything else. */
  private async owner(lock: string): Promise<number | null> {
    let text: string;
    try {
      if ((await fs.lstat(lock)).isSymbolicLink()) {
        throw new TrainingError(`the training lock ${lock} is a link, which edgeadapt never writes; delete it if no ` +
          "training runs, then retry.");
      }
      text = (await fs.readFile(lock, "latin1")).slice(0, 64).trim();
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw error;
    }
    if (!/^\d+$/.test(text) || !(Number(text) > 0 && Number(text) < MAX_PID)) {
      throw new TrainingError(`the training lock ${lock} holds '${text.slice(0, 24)}', not a process id; it was not ` +
        "written by edgeadapt: delete it if no training runs, then retry.");
    }
    return Number(text);
  }

  private async create(lock: string): Promise<boolean> {
    const temp = path.join(this.location, `.train.lock.pid-${process.pid}`);
    await fs.rm(temp, {force: true});
    await fs.writeFile(temp, String(process.pid), {flag: "wx", mode: 0o644});
    try {
      await fs.link(temp, lock);
      return true;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "EEXIST") return false;
      throw new TrainingError(`cannot lock ${this.location} for training (${(error as NodeJS.ErrnoException).code}); ` +
        "make the bundle writable.");
    } finally {
      await fs.rm(temp, {force: true});
    }
  }

  async lock(): Promise<() => Promise<void>> {
    const lock = path.join(this.location, "train.lock");
    for (let attempt = 0; attempt < 2; attempt++) {
      if (await this.create(lock)) return async () => { await fs.rm(lock, {force: true}); };
      const pid = await this.owner(lock);
      if (pid !== null && pid !== process.pid && alive(pid)) {
        throw new TrainingError(`${this.location} is being trained by process ${pid}; wait for it to finish or stop ` +
          "it, then retry.");
      }
      await fs.rm(lock, {force: true}); // stale: its process is gone
    }
    throw new TrainingError(`cannot take the training lock ${lock}; remove it if no training runs.`);
  }
}

export function deviceKeyPath(): string {
  if (process.env.EDGEADAPT_DEVICE_KEY) return process.env.EDGEADAPT_DEVICE_KEY.replace(/^~(?=$|\/)/, homedir());
  return path.join(process.env.XDG_CONFIG_HOME || path.join(homedir(), ".config"), "edgeadapt", "device.key");
}

/** The device key file shared with the Python runtime on this device (64 hex digits, mode 600). */
export class FileDeviceKey implements DeviceKeyStore {
  private key: Uint8Array | null = null;

  constructor(readonly file: string, bundleDir?: string) {
    if (bundleDir) {
      const relative = path.relative(path.resolve(bundleDir), path.resolve(file));
      if (!relative.startsWith("..") && !path.isAbsolute(relative)) {
        throw new ConfigError(`the device key ${file} lies inside the bundle ${bundleDir}; keys never travel with a ` +
          "bundle: point EDGEADAPT_DEVICE_KEY elsewhere.");
      }
    }
  }

  async get(): Promise<Uint8Array | null> {
    if (this.key) return this.key;
    let text: string;
    try {
      text = (await fs.readFile(this.file, "utf8")).trim();
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return null;
      throw new ConfigError(`the device key ${this.file} cannot be read (${(error as NodeJS.ErrnoException).code}); ` +
        "fix its permissions or point EDGEADAPT_DEVICE_KEY at another file.");
    }
    if (!/^[0-9a-fA-F]{64}$/.test(text)) {
      throw new ConfigError(`the device key ${this.file} is not 64 hex digits; delete it (state it authenticated ` +
        "will then be refused under --trusted-key) or point EDGEADAPT_DEVICE_KEY at another file.");
    }
    this.key = Uint8Array.from(text.match(/../g)!, (h) => parseInt(h, 16));
    return this.key;
  }

  async getOrCreate(): Promise<Uint8Array> {
    const existing = await this.get();
    if (existing) return existing;
    const {randomBytes} = await import("node:crypto");
    const fresh = randomBytes(32).toString("hex");
    await fs.mkdir(path.dirname(this.file), {recursive: true, mode: 0o700});
    const temp = `${path.join(path.dirname(this.file), `.${path.basename(this.file)}`)}.tmp-${process.pid}`;
    try {
      await fs.writeFile(temp, `${fresh}\n`, {flag: "wx", mode: 0o600});
      await fsyncPath(temp);
      await fs.link(temp, this.file).catch((error) => {
        if (error.code !== "EEXIST") throw error; // another process created it first: use theirs
      });
    } catch (error) {
      throw new ConfigError(`cannot create the device key ${this.file} (${(error as NodeJS.ErrnoException).code}); ` +
        "point EDGEADAPT_DEVICE_KEY at a writable file outside the bundle.");
    } finally {
      await fs.rm(temp, {force: true});
    }
    return (await this.get())!;
  }
}
