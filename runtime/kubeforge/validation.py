"""Reading RLJob files and objects, with one kind of error message everywhere.

Every reader (the CLI, the local launcher, the operator) goes through here, so a bad spec
gets the same message whoever reads it: the field path, the value, and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubeforge.spec import ABSOLUTE_PATH, DNS_1035_LABEL, MODULE_PATH, QUANTITY, RLJob, RLJobSpec

# What a regular expression in the schema means, in words a user can act on.
PATTERN_MEANINGS = {
    DNS_1035_LABEL: "lowercase letters, digits and '-', starting with a letter and ending with a letter or digit",
    QUANTITY: "a Kubernetes quantity such as 4, 500m or 16Gi",
    MODULE_PATH: "a dotted Python module name such as apps.grpo.main",
    ABSOLUTE_PATH: "an absolute path, starting with /",
}


class SpecError(ValueError):
    """A spec that cannot be used. `problems` holds one line per bad field."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: invalid RLJob ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{lines}")


def load_file(path: str | Path) -> RLJob:
    """Parse an RLJob YAML (or JSON) file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(str(path), [f"cannot read the file: {e.strerror}"]) from None
    return load_text(text, source=str(path))


def load_text(text: str, source: str = "<input>") -> RLJob:
    try:
        documents = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise SpecError(source, [f"not valid YAML: {e}"]) from None
    if len(documents) != 1:
        raise SpecError(source, [f"expected exactly one YAML document (an RLJob), found {len(documents)}"])
    return parse_job(documents[0], source=source)


def parse_job(obj: Any, source: str = "<input>") -> RLJob:
    """Validate a whole RLJob object (apiVersion, kind, metadata, spec)."""
    if not isinstance(obj, dict):
        raise SpecError(source, [f"expected a mapping with apiVersion, kind, metadata and spec, got {_show(obj)}"])
    return _validate(RLJob, obj, source, prefix=())


def parse_spec(spec: Any, source: str = "<input>") -> RLJobSpec:
    """Validate only `spec`, as the operator does with a custom resource the API server accepted."""
    return _validate(RLJobSpec, spec, source, prefix=("spec",))


def _validate(model: type[BaseModel], obj: Any, source: str, prefix: tuple[str, ...]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise SpecError(source, [describe(error, model, prefix) for error in e.errors()]) from None


def describe(error: dict[str, Any], model: type[BaseModel], prefix: tuple[str, ...] = ()) -> str:
    """One line for one pydantic error: `field.path: got VALUE; expected ...`."""
    loc = prefix + tuple(str(part) for part in error["loc"])
    where = _dotted(loc) or "(top level)"
    kind = error["type"]
    if kind == "missing":
        return f"{where}: required field is missing"
    if kind == "extra_forbidden":
        known = _known_fields(model, error["loc"][:-1])
        guess = difflib.get_close_matches(str(error["loc"][-1]), known, n=1)
        hint = f"did you mean {guess[0]!r}? " if guess else ""
        return f"{where}: unknown field; {hint}expected one of: {', '.join(known)}"
    message = error["msg"]
    pattern = (error.get("ctx") or {}).get("pattern")
    if kind == "string_pattern_mismatch" and pattern in PATTERN_MEANINGS:
        message = f"expected {PATTERN_MEANINGS[pattern]}"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    elif message.startswith("Input should be"):
        message = "expected " + message[len("Input should be ") :].replace("greater", "a value greater").replace(
            "less", "a value less"
        )
    elif message.startswith("String should"):
        message = "expected a string that should" + message[len("String should") :]
    return f"{where}: got {_show(error['input'])}; {message}"


def _dotted(loc: tuple[str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _known_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names (aliases) allowed at `loc`, found by walking the models."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            if isinstance(part, int):
                continue
            return []
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return [f.alias or n for n, f in current.model_fields.items()]
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
