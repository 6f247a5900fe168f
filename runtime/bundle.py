"""A bundle on disk, sealed: the one place that names a bundle's files and the only reader of them.

Every file the runtime reads is a plain name inside the bundle folder, opened without following links, read once
(bounded by the manifest), and checked before its bytes are handed on: exported files against the manifest's sha256,
graphs also for what they reference (no external data, standard operators only, the interface the runtime feeds),
and what the device wrote itself (trained state, INT8 prefix, feature cache) against this device's key. With a
trusted key, only content signed by the host or authenticated by this device is used (runtime/COMPATIBILITY.md)."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from edgeadapt.runtime.atomic import atomic_write
from edgeadapt.runtime.errors import BundleError, ConfigError
from edgeadapt.runtime.manifest import (
    CHECKPOINT,
    EVAL_MODEL,
    GRAD_SHARE,
    GRAD_SUM,
    MANIFEST_NAME,
    OPTIMIZER_MODEL,
    TRAINING_MODEL,
    Manifest,
    is_plain_name,
    ort_training_files,
)
from edgeadapt.runtime.onnx_wire import (
    STANDARD_DOMAINS,
    GraphInterface,
    graph_interface,
    trailing_metadata,
    with_metadata,
)
from edgeadapt.runtime.signing import SIGNATURE_NAME, DeviceSeal
from edgeadapt.runtime.state import (
    MAC_KEY,
    STATE_FILE,
    STATISTICS_INPUT,
    TrainState,
    decode_state,
    device_authenticated,
    save_state,
)

ORT_GRAPHS = (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL)
TRAIN_LOG = "train_log.jsonl"
LOCK_FILE = "train.lock"
FEATURE_CACHE = "feature_cache"
INT8_PREFIX = "prefix_int8.onnx"
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILE_BYTES = 8 << 30  # a listed file without a recorded size (bundles exported before 0.3.1)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def read_plain(folder: Path, name: str, limit: int) -> bytes:
    """The bytes of `folder/name`, a regular file with a plain name (not a link, FIFO or device), at most `limit`."""
    if not is_plain_name(name):
        raise BundleError(f"{name!r} is not a plain file name inside {folder}; re-export the bundle.")
    path = Path(folder) / name
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise BundleError(f"bundle {folder} misses {name}; re-export it or copy the whole bundle again.") from None
    except OSError as exc:
        why = "a link" if exc.errno in (errno.ELOOP, errno.EMLINK) else exc.strerror
        raise BundleError(f"{path} cannot be read ({why}); a bundle holds plain files only: copy it again.") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BundleError(f"{path} is not a regular file; a bundle holds plain files only: copy it again.")
        if info.st_size > limit:
            raise BundleError(f"{path} has {info.st_size:,} bytes, more than the {limit:,} it may have; it was "
                              "modified or corrupted: re-export the bundle or copy it again.")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise BundleError(f"{path} grew past {limit:,} bytes while read; copy the bundle again.")
    return data


def state_size_limit(manifest: Manifest) -> int:
    """The most bytes a state file of this layout can need: parameters, moments, best parameters, ORT training's
    checkpoint (all float32, with room), the BN statistics, and headers and progress."""
    portable = manifest.portable
    return 64 * sum(p.size for p in portable.layout) + 4 * sum(p.size for p in portable.statistics) + (64 << 20)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class GraphFiles:
    """The graphs one training target runs (file names in the bundle): the portable step and forward graph, and ORT
    training's artifacts."""

    input_name: str
    train_step: str
    forward: str
    ort_training: str
    ort_eval: str
    ort_optimizer: str
    ort_checkpoint: str
    accumulates: bool = False  # train_step is the accumulating step (grad_sum, grad_share -> grad_sum.new)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    trusted: bool = False  # opened with a trusted key: unsigned, unauthenticated content is refused
    signature: bytes | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | Path, verify: bool = True, trusted_key: str | Path | None = None) -> "Bundle":
        """Read the manifest once (the bytes checked against the signature are the bytes parsed), then check every
        listed file (see `verify`). With a `trusted_key`, the manifest must carry a valid signature by it."""
        path = Path(path)
        if not path.is_dir():
            raise BundleError(f"bundle {path} does not exist or is not a folder; create it with `edgeadapt export`.")
        if not (path / MANIFEST_NAME).exists() and not (path / MANIFEST_NAME).is_symlink():
            raise BundleError(f"{path} has no {MANIFEST_NAME}: it is not an edgeadapt bundle; create one with "
                              "`edgeadapt export`.")
        raw = read_plain(path, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        signature = read_plain(path, SIGNATURE_NAME, 4096) if (path / SIGNATURE_NAME).exists() else None
        if trusted_key is not None:
            from edgeadapt.runtime.signing import verify_signature

            verify_signature(path, raw, signature, Path(trusted_key))
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{path / MANIFEST_NAME} is not UTF-8 text; re-export the bundle.") from None
        bundle = cls(path, Manifest.from_json(text, str(path / MANIFEST_NAME)), trusted_key is not None, signature)
        if verify:
            bundle.verify()
        return bundle

    # ---- names ------------------------------------------------------------------------------------------------

    def graphs(self, split: bool = False, accumulating: bool = False) -> GraphFiles:
        """Whole-graph files, or (split) the suffix's, which take the boundary tensor as input; `accumulating`:
        with the step that accumulates micro-batches as the training step."""
        prefix = self.manifest.split.suffix_prefix if split else ""
        portable = self.manifest.portable
        if accumulating and not portable.accumulating_step:
            raise ConfigError(f"{self.path} was exported before gradient accumulation (edgeadapt < 0.4) and has no "
                              "accumulating step: train without --accumulate or re-export the bundle.")
        step = portable.accumulating_step if accumulating else portable.train_step
        return GraphFiles(self.manifest.split.boundary if split else self.manifest.input.name,
                          f"{prefix}{step}", f"{prefix}{portable.forward}",
                          *(f"{prefix}{name}" for name in (*ORT_GRAPHS, CHECKPOINT)), accumulating)

    def exported_files(self) -> list[str]:
        return sorted(self.manifest.files)

    @property
    def state_path(self) -> Path:
        return self.path / STATE_FILE

    @property
    def log_path(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def lock_path(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def int8_prefix_path(self) -> Path:
        return self.path / INT8_PREFIX

    @property
    def cache_path(self) -> Path:
        return self.path / FEATURE_CACHE

    @property
    def bundle_id(self) -> str:
        """Ties state files to this bundle's training step."""
        return self.manifest.files[self.manifest.portable.train_step][:16]

    # ---- reading ----------------------------------------------------------------------------------------------

    def verify(self) -> None:
        """Every listed file is present, a plain file, and matches its sha256 (graphs: and their checks); the state
        file matches or is a state of this layout (with a trusted key: authenticated by this device). ONNX Runtime
        training's artifacts may be absent (a bundle packed for apps); present, they are verified like the rest."""
        optional = set(ort_training_files(self.manifest))
        for name in self.exported_files():
            if name in optional and not self.has(name):
                continue
            if name == STATE_FILE:
                self.load_state()
            elif name.endswith(".onnx"):
                self.read_graph(name)
            else:
                self.read(name)

    def has(self, name: str) -> bool:
        """Whether the bundle folder holds an entry of that name (of any kind: reading it checks the rest)."""
        return (self.path / name).exists() or (self.path / name).is_symlink()

    def _limit(self, name: str) -> int:
        return self.manifest.sizes.get(name, MAX_FILE_BYTES)

    def read(self, name: str) -> bytes:
        """An exported file's bytes, verified against the manifest's sha256."""
        if name not in self.manifest.files:
            raise BundleError(f"{name} is not listed in {self.path / MANIFEST_NAME}; re-export the bundle.")
        data = read_plain(self.path, name, self._limit(name))
        if sha256(data) != self.manifest.files[name]:
            raise BundleError(f"{self.path / name} does not match the sha256 in manifest.json: it was modified or "
                              "corrupted; re-export the bundle or copy it again.")
        return data

    def tokenizer(self):
        """The WordPiece tokenizer of a text bundle, over its verified vocabulary (runtime/text.py)."""
        from edgeadapt.runtime.text import WordPiece

        spec = self.manifest.input.tokens
        if spec is None:
            raise BundleError(f"{self.path} is not a text bundle: it has no tokens section.")
        try:
            text = self.read(spec.vocab_file).decode("utf-8")
        except UnicodeDecodeError:
            raise BundleError(f"{self.path / spec.vocab_file} is not UTF-8 text; re-export the bundle.") from None
        return WordPiece.from_text(text, spec)

    def examples(self, batch: int, seed: int = 0):
        """Example model inputs of this bundle's kind (runtime/samples.py)."""
        from edgeadapt.runtime.samples import example_batch

        encode = self.tokenizer().encode_batch if self.manifest.input.tokens else None
        return example_batch(self.manifest.input, batch, seed, encode)

    def read_graph(self, name: str) -> bytes:
        """An exported graph's verified bytes, refused if it references anything outside itself or (portable
        graphs) uses operators outside the standard domain or inputs the runtime does not feed."""
        data = self.read(name)
        inputs, logits = self._roles().get(name, (None, False))
        interface = check_graph(self.path / name, data, inputs)
        if logits:
            self._check_outputs(name, interface)
        return data

    def _check_outputs(self, name: str, interface: GraphInterface) -> None:
        """The logits are there, one per label; a step's labels have the dtype the runtime feeds for the loss."""
        m = self.manifest
        logits = interface.outputs.get(m.output_name)
        if logits is None:
            raise BundleError(f"{self.path / name} has no output '{m.output_name}' (manifest output_name); "
                              "re-export the bundle.")
        if logits[1] and logits[1][-1] > 0 and logits[1][-1] != m.num_outputs:
            raise BundleError(f"{self.path / name} gives {logits[1][-1]} outputs per sample but the manifest has "
                              f"{m.num_outputs} labels; re-export the bundle.")
        labels = interface.inputs.get("labels")
        wanted = "int64" if m.loss == "cross_entropy" else "float32"
        if labels is not None and labels[0] != wanted:
            raise BundleError(f"{self.path / name} takes {labels[0]} labels, but the {m.loss} loss is fed "
                              f"{wanted}; re-export the bundle.")

    def _roles(self) -> dict[str, tuple[set[str], bool]]:
        """Per portable graph: the inputs the runtime feeds it, and whether it gives the logits (ORT training's
        artifacts are not listed: they are checked for external data only)."""
        m, portable = self.manifest, self.manifest.portable
        stats = {STATISTICS_INPUT} if portable.statistics else set()
        roles = {portable.statistics_graph: ({m.input.name, "params"}, False)}
        targets = [("", m.input.name)] + ([(m.split.suffix_prefix, m.split.boundary)] if m.split else [])
        for prefix, data_input in targets:
            step_inputs = {data_input, "labels", "lr", "step", *portable.state} | stats
            roles[prefix + portable.train_step] = (step_inputs, True)
            if portable.accumulating_step:
                roles[prefix + portable.accumulating_step] = (step_inputs | {GRAD_SUM, GRAD_SHARE}, True)
            roles[prefix + portable.forward] = ({data_input, "params"} | stats, True)
        if m.split is not None:
            roles[m.split.prefix_model] = ({m.input.name} | stats, False)
        if m.lora is not None:
            roles[m.lora.merged_forward] = ({m.input.name, "params"} | stats, True)
        return roles

    def state_bytes(self) -> bytes:
        """The state file's bytes, once: a consistent snapshot even while a trainer replaces it."""
        return read_plain(self.path, STATE_FILE, state_size_limit(self.manifest))

    def load_state(self) -> TrainState:
        """The trained state (see `state_bytes`): the exported one (its sha256), or one this device wrote (its
        key's HMAC); anything else only without a trusted key."""
        data = self.state_bytes()
        if self.trusted and sha256(data) != self.manifest.files[STATE_FILE] and \
                not device_authenticated(data, self.seal):
            raise BundleError(f"{self.state_path} is neither the exported state nor one this device trained (no "
                              "valid device authentication); under --trusted-key it is refused: copy the bundle "
                              "again from its publisher.")
        return decode_state(data, self.manifest, self.bundle_id, str(self.state_path))

    def save_state(self, state: TrainState) -> None:
        """Atomically replace the state file, authenticated by this device."""
        save_state(self.state_path, state, self.manifest, self.bundle_id, self.seal)

    def write_device_graph(self, name: str, model: bytes) -> None:
        """Atomically write a graph this device computed (e.g. the INT8 prefix), authenticated by its key."""
        tag = self.seal.tag(name, model)
        atomic_write(self.path / name, lambda tmp: tmp.write_bytes(with_metadata(model, MAC_KEY, tag)))

    def read_device_graph(self, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
        """A graph this device computed, checked like an exported one; with a trusted key it must carry this
        device's authentication."""
        data = read_plain(self.path, name, limit)
        covered, tag = trailing_metadata(data, MAC_KEY)
        if self.trusted and not self.seal.valid(name, tag, covered):
            raise BundleError(f"{self.path / name} was not computed on this device (no valid device "
                              f"authentication); under --trusted-key it is refused: delete it and run "
                              f"`edgeadapt quantize-prefix` again.")
        check_graph(self.path / name, data, None)
        return data

    @functools.cached_property
    def seal(self) -> DeviceSeal:
        return DeviceSeal(self.path, self.bundle_id)


def check_graph(path: Path, data: bytes, expected_inputs: set[str] | None) -> GraphInterface:
    """Refuse a graph that is malformed, keeps tensor data outside itself, or (portable graphs, whose inputs the
    runtime knows) uses non-standard operators or needs inputs the runtime does not feed."""
    try:
        interface = graph_interface(data)
    except ValueError as exc:
        raise BundleError(f"{path} is not a readable ONNX model ({exc}); re-export the bundle.") from None
    if interface.external_data:
        raise BundleError(f"{path} keeps tensor data in external files; a bundle's graphs must hold all their data "
                          "(nothing outside the bundle is read): re-export the bundle.")
    if expected_inputs is None:
        return interface
    custom = sorted(interface.domains - set(STANDARD_DOMAINS))
    if custom:
        raise BundleError(f"{path} uses operators of the domain '{custom[0]}'; portable graphs use standard ONNX "
                          "only: re-export the bundle.")
    extra = [name for name in interface.required_inputs if name not in expected_inputs]
    if extra:
        raise BundleError(f"{path} needs the input '{extra[0]}', which the runtime does not feed; re-export the "
                          "bundle.")
    return interface
