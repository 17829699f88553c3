"""The image names `make images` builds, and the keys its cache goes by.

    python images/tags.py refs              IMAGE REF, one line per image (operator, runtime-cpu, runtime-cuda)
    python images/tags.py ref IMAGE         that image's reference, kubeforge/IMAGE:VERSION-HASH
    python images/tags.py key IMAGE         the build cache key: the tag plus every file the Dockerfile copies in
    python images/tags.py base FLAVOUR      the base image's reference (python | runtime), from images/base.sh

Tag = the project version and 12 hex digits of a sha256 over the image's *environment* inputs:
its Dockerfile, images/base.sh (the debootstrap recipe of the base), images/pins.py, the pins
in pyproject.toml that the image installs (build-system, requires-python, the dependencies, its
extra, [tool.kubeforge].vllm for the runtimes) and RECIPE below. So the names committed in the
repository (spec.image's default, the chart, the examples) change only when what is installed
changes, never with a code change. The cache key adds the source trees the Dockerfile copies
(runtime/, apps/, operator/, pyproject.toml, ...): a code change rebuilds and re-saves the image
under the same tag. tests/test_images.py checks every name in the repository against `refs`.

Standard library only, like pins.py.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Bump when images/build.sh changes what goes into an image (build arguments, the way the
# wheelhouse is made): it is part of every tag.
RECIPE = 1
REGISTRY = "kubeforge"
IMAGES = ("operator", "runtime-cpu", "runtime-cuda")
# The extras each image installs (images/*/Dockerfile: pins.py deps ...).
EXTRAS = {"operator": ["operator"], "runtime-cpu": ["runtime"], "runtime-cuda": ["runtime"]}
# Which base each image builds on in `make images` (images/base.sh FLAVOUR).
BASES = {"operator": "python", "runtime-cpu": "runtime", "runtime-cuda": "runtime"}
# Not part of the build context's meaning: bytecode and tool caches (.dockerignore drops them too).
SKIP = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.ruff_cache|[^/]*\.egg-info)(/|$)|\.py[cod]$")


def _sha(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "big"))
        digest.update(chunk)
    return digest.hexdigest()


def _pyproject(repo: Path) -> dict:
    return tomllib.loads((repo / "pyproject.toml").read_text())


def version(repo: Path = REPO) -> str:
    return _pyproject(repo)["project"]["version"]


def pins(image: str, repo: Path = REPO) -> dict:
    """The part of pyproject.toml that decides what `image` installs."""
    data = _pyproject(repo)
    project = data["project"]
    chosen = {
        "build-system": data.get("build-system", {}),
        "requires-python": project.get("requires-python"),
        "dependencies": project["dependencies"],
        "extras": {e: project["optional-dependencies"][e] for e in EXTRAS[image]},
    }
    if image.startswith("runtime"):
        chosen["vllm"] = data["tool"]["kubeforge"]["vllm"]
    return chosen


def base_hash(flavour: str, repo: Path = REPO) -> str:
    return _sha(b"base", flavour.encode(), (repo / "images" / "base.sh").read_bytes())[:12]


def base_ref(flavour: str, repo: Path = REPO) -> str:
    return f"{REGISTRY}/base-{flavour}:bookworm-{base_hash(flavour, repo)}"


def tag(image: str, repo: Path = REPO) -> str:
    if image not in IMAGES:
        raise SystemExit(f"tags.py: no image {image!r}; the images are {', '.join(IMAGES)}")
    inputs = [
        f"recipe={RECIPE}".encode(),
        (repo / "images" / image / "Dockerfile").read_bytes(),
        (repo / "images" / "base.sh").read_bytes(),
        BASES[image].encode(),
        (repo / "images" / "pins.py").read_bytes(),
        json.dumps(pins(image, repo), sort_keys=True).encode(),
    ]
    return f"{version(repo)}-{_sha(*inputs)[:12]}"


def ref(image: str, repo: Path = REPO) -> str:
    return f"{REGISTRY}/{image}:{tag(image, repo)}"


def copied(image: str, repo: Path = REPO) -> list[str]:
    """The context paths the Dockerfile COPYs (not --from another stage)."""
    text = re.sub(r"\\\n", " ", (repo / "images" / image / "Dockerfile").read_text())
    sources: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].upper() not in {"COPY", "ADD"} or any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words[1:] if not w.startswith("--")][:-1]
    return sources


def key(image: str, repo: Path = REPO) -> str:
    """The tag plus the content of every file the build copies in: when it changes, build again."""
    chunks = [tag(image, repo).encode()]
    for source in sorted(set(copied(image, repo))):
        top = repo / source
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            rel = path.relative_to(repo).as_posix()
            if not SKIP.search(rel):
                chunks += [rel.encode(), path.read_bytes()]
    return _sha(*chunks)[:16]


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    if argv == ["refs"]:
        print("\n".join(f"{image} {ref(image)}" for image in IMAGES))
    elif len(argv) == 2 and argv[0] in {"ref", "key"}:
        print((ref if argv[0] == "ref" else key)(argv[1]))
    elif len(argv) == 2 and argv[0] == "base" and argv[1] in set(BASES.values()):
        print(base_ref(argv[1]))
    else:
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
