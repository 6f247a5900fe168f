"""Bundles as single files for transfer: `pack` writes a .tar.gz of the bundle's files; `unpack` extracts one
safely — only regular files with plain names (no paths, `..`, links or devices), bounded in size — into a new
folder that appears complete or not at all."""

from __future__ import annotations

import tarfile
from pathlib import Path

from edgeadapt.runtime.atomic import atomic_write, check_output_dir, staged_dir
from edgeadapt.runtime.bundle import Bundle
from edgeadapt.runtime.errors import BundleError

MAX_ARCHIVE_BYTES = 8 * 1024**3


def pack(bundle_dir: Path, archive: Path) -> Path:
    bundle = Bundle.open(bundle_dir)
    files = sorted(f for f in bundle.path.iterdir() if f.is_file() and not f.name.startswith("."))

    def write(tmp: Path) -> None:
        with tarfile.open(tmp, "w:gz") as tar:
            for file in files:
                tar.add(file, arcname=file.name, recursive=False)

    atomic_write(Path(archive), write)
    return Path(archive)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if not member.isreg():
        kind = "a link" if member.issym() or member.islnk() else "not a regular file"
        raise BundleError(f"{archive} holds {name!r}, which is {kind}; a bundle archive holds plain files only: "
                          "do not use it.")
    if "/" in name or "\\" in name or name in ("", ".", "..") or name.startswith("."):
        raise BundleError(f"{archive} holds the path {name!r} (outside the bundle folder); do not use it.")


def unpack(archive: Path, out: Path, force: bool = False) -> Bundle:
    archive, out = Path(archive), Path(out)
    check_output_dir(out, force)
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            if sum(m.size for m in members) > MAX_ARCHIVE_BYTES:
                raise BundleError(f"{archive} unpacks to more than {MAX_ARCHIVE_BYTES >> 30} GB; refused.")
            with staged_dir(out) as staging:
                for member in members:
                    source = tar.extractfile(member)
                    (staging / member.name).write_bytes(source.read())
                Bundle.open(staging)  # a complete, hash-consistent bundle or nothing
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{archive} is not a readable bundle archive ({type(exc).__name__}); pack it with "
                          "`edgeadapt pack`.") from None
    return Bundle.open(out)
