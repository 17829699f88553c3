"""Write a one-layer container image as a docker-archive tarball (what `docker save` writes and
`ctr images import` reads), from files on this machine. For the testbed's own small images:
the sandbox ("pause") image and a busybox for the PVC provisioner's helper pods. Nothing is
pulled from a registry; the archive is reproducible (fixed mtimes, sorted entries).

Usage: python3 image_archive.py OUT.tar REF ENTRYPOINT_JSON USER ENTRY...
  SRC=DEST      copy file SRC into the image at DEST (mode kept)
  @TARGET=DEST  a symlink at DEST pointing to TARGET
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path


def _dirs(path: str) -> list[str]:
    parts = Path(path).parts[1:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def layer(entries: list[str]) -> bytes:
    """The layer's tar: every parent directory, then the files and links, in a fixed order."""
    files: dict[str, tuple[str, str]] = {}
    for entry in entries:
        source, _, dest = entry.partition("=")
        if not dest.startswith("/"):
            raise SystemExit(f"image_archive: {entry!r}: the image path must be absolute")
        files[dest] = ("link", source[1:]) if source.startswith("@") else ("file", source)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted({d for dest in files for d in _dirs(dest)}):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for dest, (kind, source) in sorted(files.items()):
            info = tarfile.TarInfo(dest.lstrip("/"))
            info.mtime = 0
            if kind == "link":
                info.type, info.linkname, info.mode = tarfile.SYMTYPE, source, 0o777
                tar.addfile(info)
                continue
            data = Path(source).read_bytes()
            info.size, info.mode = len(data), Path(source).stat().st_mode & 0o7777
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def archive(out: Path, ref: str, entrypoint: list[str], user: str, entries: list[str]) -> None:
    layer_tar = layer(entries)
    diff_id = "sha256:" + hashlib.sha256(layer_tar).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": entrypoint, "User": user, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "kubeforge testbed/image_archive.py"}],
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    layer_name = diff_id.removeprefix("sha256:") + "/layer.tar"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [ref], "Layers": [layer_name]}]).encode()
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in ((layer_name, layer_tar), (config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)


def main(argv: list[str]) -> None:
    if len(argv) < 6:
        raise SystemExit(__doc__)
    out, ref, entrypoint, user, *entries = argv[1:]
    archive(Path(out), ref, json.loads(entrypoint), user, entries)


if __name__ == "__main__":
    main(sys.argv)
