"""Who vouches for a bundle's bytes. The host: an ed25519 signature over `manifest.json` (which holds every exported
file's sha256 and size, the initial state included), stored as `manifest.sig`; with a trusted public key the
runtime refuses unsigned or wrongly signed bundles. The device: a local key (never in a bundle) whose HMAC
authenticates what this device trained or computed (see `DeviceSeal`). runtime/COMPATIBILITY.md has the rules."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

from edgeadapt.runtime.atomic import atomic_write
from edgeadapt.runtime.errors import BundleError, ConfigError

SIGNATURE_NAME = "manifest.sig"


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("signing needs the `cryptography` package: pip install cryptography.") from None
    return ed25519, serialization, InvalidSignature


def generate_keypair(private_path: Path) -> Path:
    """Write an ed25519 private key (PEM, mode 600) and its public key next to it (`.pub`); return the .pub path."""
    ed25519, serialization, _ = _crypto()
    if private_path.exists():
        raise ConfigError(f"{private_path} exists; choose another path (keys are never overwritten).")
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public_path = private_path.with_name(private_path.name + ".pub")
    atomic_write(private_path, lambda tmp: (tmp.write_bytes(private), tmp.chmod(0o600)))
    atomic_write(public_path, lambda tmp: tmp.write_bytes(public))
    return public_path


def _load(path: Path, private: bool):
    ed25519, serialization, _ = _crypto()
    try:
        data = Path(path).read_bytes()
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as exc:
        kind = "private" if private else "public"
        raise ConfigError(f"{path} is not a readable {kind} ed25519 key ({type(exc).__name__}); create one with "
                          "`edgeadapt keygen`.") from None
    expected = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, expected):
        raise ConfigError(f"{path} is not an ed25519 key; create one with `edgeadapt keygen`.")
    return key


def sign_bundle(bundle_dir: Path, private_key: Path) -> None:
    key = _load(private_key, private=True)
    signature = key.sign((Path(bundle_dir) / "manifest.json").read_bytes())
    (Path(bundle_dir) / SIGNATURE_NAME).write_text(base64.b64encode(signature).decode() + "\n")


def verify_signature(bundle_dir: Path, manifest: bytes, signature: bytes | None, public_key: Path) -> None:
    """Raise BundleError unless `signature` (the bytes of `manifest.sig`, None when absent) is a valid signature of
    `manifest` (the bytes of `manifest.json` that will be parsed) by `public_key`."""
    _, _, invalid = _crypto()
    key = _load(public_key, private=False)
    if signature is None:
        raise BundleError(f"bundle {bundle_dir} is not signed but a trusted key was given; ask its publisher for a "
                          "signed bundle (`edgeadapt export --sign KEY`).")
    try:
        key.verify(base64.b64decode(signature.decode("ascii").strip(), validate=True), manifest)
    except (invalid, ValueError, UnicodeDecodeError):
        raise BundleError(f"bundle {bundle_dir} has a signature that does not match {public_key}: it was modified "
                          "or signed by someone else; do not use it.") from None


# ---- device-side authentication: what this device trained or computed itself ------------------------------------
# The host's signature covers what it exported. State that this device trained (and the INT8 prefix and the feature
# cache it computed) is authenticated with a key that only this device holds, never inside a bundle: an HMAC-SHA256
# over the content, bound to its kind and to the bundle's id, stored inside the file it covers.

DEVICE_KEY_ENV = "EDGEADAPT_DEVICE_KEY"


def device_key_path() -> Path:
    """`$EDGEADAPT_DEVICE_KEY`, else `~/.config/edgeadapt/device.key` (`$XDG_CONFIG_HOME` when set)."""
    if os.environ.get(DEVICE_KEY_ENV):
        return Path(os.environ[DEVICE_KEY_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "edgeadapt" / "device.key"


def _read_key(path: Path) -> bytes | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the device key {path} cannot be read ({type(exc).__name__}); fix its permissions or "
                          f"point {DEVICE_KEY_ENV} at another file.") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"the device key {path} is not 64 hex digits; delete it (state it authenticated will then "
                          f"be refused under --trusted-key) or point {DEVICE_KEY_ENV} at another file.")
    return key


def _create_key(path: Path) -> bytes:
    """A new random key, written whole before it appears (a hard link of a complete temp file)."""
    key = secrets.token_bytes(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the device key {path} ({exc.strerror or exc}); point {DEVICE_KEY_ENV} at "
                          "a writable file outside the bundle.") from None
    return _read_key(path) or key


class DeviceSeal:
    """Authenticates what this device writes into one bundle. `tag(kind, data)` → hex HMAC; `valid(kind, data,
    tag)`. The key is created on first write; a device without one has authenticated nothing yet."""

    def __init__(self, bundle_dir: Path, bundle_id: str):
        self.path = device_key_path()
        if _inside(self.path, Path(bundle_dir)):
            raise ConfigError(f"the device key {self.path} lies inside the bundle {bundle_dir}; keys never travel "
                              f"with a bundle: point {DEVICE_KEY_ENV} elsewhere.")
        self.bundle_id = bundle_id
        self._key: bytes | None = None

    def _mac(self, key: bytes, kind: str, parts) -> str:
        mac = hmac.new(key, b"edgeadapt-device-seal\0" + kind.encode() + b"\0" + self.bundle_id.encode() + b"\0",
                       hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.hexdigest()

    def tag(self, kind: str, *parts) -> str:
        """The HMAC of the concatenated `parts` as `kind` of this bundle (creating the device key if needed)."""
        if self._key is None:
            self._key = _read_key(self.path) or _create_key(self.path)
        return self._mac(self._key, kind, parts)

    def valid(self, kind: str, tag: str | None, *parts) -> bool:
        if not tag:
            return False
        key = self._key or _read_key(self.path)
        if key is None:
            return False
        self._key = key
        return hmac.compare_digest(self._mac(key, kind, parts), str(tag))


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True
