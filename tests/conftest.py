import copy
from typing import Any

import pytest

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
