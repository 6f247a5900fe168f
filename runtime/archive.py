"""Bundles as single files for transfer. `pack` writes a .tar.gz of exactly the bundle's own files: `manifest.json`
first (then `manifest.sig` when signed), then every file the manifest lists — no logs, caches or locks; packed for
apps (`for_app`), without ONNX Runtime training's artifacts, which only the `ort-training` engine reads. `unpack`
reads one as a stream and accepts nothing else: the manifest first (bounded), then each listed file exactly once, as
a regular file with its plain name, its size bounded by the manifest before anything is written, copied in chunks
and hashed on the way; the result appears complete in one rename or not at all, and replacing a bundle (`--force`)
is refused while a trainer holds it."""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
from pathlib import Path

from edgeadapt.runtime.atomic import atomic_write, check_output_dir, remove_stale_siblings, staged_dir
from edgeadapt.runtime.bundle import LOCK_FILE, MAX_FILE_BYTES, MAX_MANIFEST_BYTES, Bundle, state_size_limit
from edgeadapt.runtime.errors import BundleError
from edgeadapt.runtime.lock import bundle_lock
from edgeadapt.runtime.manifest import MANIFEST_NAME, Manifest, is_plain_name, ort_training_files
from edgeadapt.runtime.signing import SIGNATURE_NAME
from edgeadapt.runtime.state import STATE_FILE

_CHUNK = 1 << 20


def pack(bundle_dir: Path, archive: Path, for_app: bool = False) -> Path:
    bundle = Bundle.open(bundle_dir)
    left_out = set(ort_training_files(bundle.manifest)) if for_app else set()
    files = [name for name in bundle.exported_files() if name not in left_out and bundle.has(name)]
    names = [MANIFEST_NAME] + ([SIGNATURE_NAME] if bundle.signature is not None else []) + files

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in names:
                info = tar.gettarinfo(bundle.path / name, arcname=name)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(bundle.path / name, "rb") as fh:
                    tar.addfile(info, fh)

    atomic_write(Path(archive), write)
    return Path(archive)


def _refuse(archive: Path, what: str) -> BundleError:
    return BundleError(f"{archive} {what}; a bundle archive holds exactly its manifest's files: do not use it.")


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if not is_plain_name(name):
        raise _refuse(archive, f"holds the path {name!r} (not a plain name inside the bundle folder)")
    if not member.isreg() or member.issparse():
        kind = "a link" if member.issym() or member.islnk() else "a sparse file" if member.isreg() else \
            "not a regular file"
        raise _refuse(archive, f"holds {name!r}, which is {kind}")


def _copy(source, target: Path, size: int, archive: Path, name: str) -> str:
    """Stream `size` bytes from `source` to `target`; their sha256."""
    digest, left = hashlib.sha256(), size
    with open(target, "wb") as out:
        while left:
            block = source.read(min(_CHUNK, left))
            if not block:
                raise _refuse(archive, f"ends inside {name!r}")
            digest.update(block)
            out.write(block)
            left -= len(block)
    return digest.hexdigest()


def _limit(manifest: Manifest, name: str) -> int:
    if name == STATE_FILE:  # trained state is larger than the exported one: moments, best parameters, progress
        return max(manifest.sizes.get(name, 0), state_size_limit(manifest))
    return manifest.sizes.get(name, MAX_FILE_BYTES)


def _read_manifest(tar: tarfile.TarFile, archive: Path) -> tuple[bytes, Manifest]:
    member = tar.next()
    if member is None or member.name != MANIFEST_NAME:
        raise _refuse(archive, f"does not start with {MANIFEST_NAME} (packed by an edgeadapt before 0.3.1? pack it "
                               "again with `edgeadapt pack`)")
    _check_member(member, archive)
    if member.size > MAX_MANIFEST_BYTES:
        raise _refuse(archive, f"has a {member.size:,}-byte manifest")
    raw = tar.extractfile(member).read(member.size)
    try:
        return raw, Manifest.from_json(raw.decode("utf-8"), f"{archive}:{MANIFEST_NAME}")
    except UnicodeDecodeError:
        raise _refuse(archive, "has a manifest that is not UTF-8") from None


def _extract(tar: tarfile.TarFile, archive: Path, staging: Path) -> None:
    raw, manifest = _read_manifest(tar, archive)
    (staging / MANIFEST_NAME).write_bytes(raw)
    expected, seen = set(manifest.files) | {SIGNATURE_NAME}, {MANIFEST_NAME}
    while (member := tar.next()) is not None:
        _check_member(member, archive)
        name = member.name
        if name in seen:
            raise _refuse(archive, f"holds {name!r} twice")
        if name not in expected:
            raise _refuse(archive, f"holds {name!r}, which its manifest does not list")
        limit = 4096 if name == SIGNATURE_NAME else _limit(manifest, name)
        if member.size > limit:
            raise _refuse(archive, f"holds {name!r} of {member.size:,} bytes, more than the {limit:,} its manifest "
                                   "allows")
        seen.add(name)
        digest = _copy(tar.extractfile(member), staging / name, member.size, archive, name)
        if name in manifest.files and name != STATE_FILE and digest != manifest.files[name]:
            raise _refuse(archive, f"holds {name!r}, whose sha256 differs from its manifest's")
    missing = sorted(set(manifest.files) - seen - set(ort_training_files(manifest)))
    if missing:
        raise _refuse(archive, f"lacks {missing[0]!r}")


def _locked_if_bundle(out: Path):
    """Hold an existing bundle's training lock while it is replaced: a running trainer makes `--force` fail."""
    return bundle_lock(out / LOCK_FILE) if (out / MANIFEST_NAME).is_file() else contextlib.nullcontext()


def unpack(archive: Path, out: Path, force: bool = False, trusted_key: Path | None = None) -> Bundle:
    archive, out = Path(archive), Path(out)
    check_output_dir(out, force)
    remove_stale_siblings(out)  # staging folders of an unpack that was killed
    try:
        with tarfile.open(archive, "r|*") as tar, _locked_if_bundle(out), staged_dir(out) as staging:
            _extract(tar, archive, staging)
            Bundle.open(staging, trusted_key=trusted_key)  # a complete, verified bundle or nothing
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise BundleError(f"{archive} is not a readable bundle archive ({type(exc).__name__}); pack it with "
                          "`edgeadapt pack`.") from None
    return Bundle.open(out, trusted_key=trusted_key)
