"""Signed bundles: an ed25519 signature over `manifest.json` (which holds every exported file's sha256), stored as
`manifest.sig`. With a trusted public key the runtime refuses unsigned or wrongly signed bundles."""

from __future__ import annotations

import base64
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


def verify_bundle(bundle_dir: Path, public_key: Path) -> None:
    """Raise BundleError unless `manifest.json` carries a valid signature by `public_key`."""
    _, _, invalid = _crypto()
    key = _load(public_key, private=False)
    signature_file = Path(bundle_dir) / SIGNATURE_NAME
    if not signature_file.is_file():
        raise BundleError(f"bundle {bundle_dir} is not signed but a trusted key was given; ask its publisher for a "
                          "signed bundle (`edgeadapt export --sign KEY`).")
    try:
        signature = base64.b64decode(signature_file.read_text().strip(), validate=True)
        key.verify(signature, (Path(bundle_dir) / "manifest.json").read_bytes())
    except (invalid, ValueError):
        raise BundleError(f"bundle {bundle_dir} has a signature that does not match {public_key}: it was modified "
                          "or signed by someone else; do not use it.") from None
