import copy
from pathlib import Path
from typing import Any

import pytest
from kubeforge.tiny_model import write_tiny_model

MINIMAL: dict[str, Any] = {
    "apiVersion": "kubeforge.dev/v1alpha1",
    "kind": "RLJob",
    "metadata": {"name": "demo"},
    "spec": {"model": {"path": "/models/tiny"}},
}


@pytest.fixture
def minimal_job() -> dict[str, Any]:
    """The smallest valid RLJob, as a fresh dict a test may change."""
    return copy.deepcopy(MINIMAL)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3 with its tokenizer, made offline once per session."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny-qwen3", seed=0)
