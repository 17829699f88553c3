"""The CRD is generated from kubeforge.spec; crds/ must never drift from it."""

import subprocess
import sys
from pathlib import Path

import yaml
from kubeforge.crd import crd_manifest, render_crd

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "rljob.yaml"

# JSON Schema that a structural schema refuses, or that OpenAPI v3.0 spells differently.
FORBIDDEN = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "const", "title", "exclusiveMinimum", "exclusiveMaximum"}


def test_crds_folder_matches_the_schema():
    assert CRD_FILE.read_text() == render_crd(), "crds/rljob.yaml is stale: run `make crd`"


def test_cli_prints_the_same_crd():
    out = subprocess.run([sys.executable, "-m", "kubeforge.cli", "crd"], capture_output=True, text=True, check=True)
    assert out.stdout == CRD_FILE.read_text()


def _walk(node, path="openAPIV3Schema"):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_schema_is_structural():
    schema = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not FORBIDDEN & node.keys(), f"{path} uses {FORBIDDEN & node.keys()}"
        typed = (
            "type" in node or node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")
        )
        assert typed, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_crd_carries_names_columns_and_status():
    crd = yaml.safe_load(CRD_FILE.read_text())
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == "rljobs.kubeforge.dev"
    assert (names["kind"], names["plural"], names["shortNames"]) == ("RLJob", "rljobs", ["rlj"])
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Phase",
        "Step",
        "Reward",
        "Held-out",
        "Restarts",
        "Age",
    ]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["model"]
    assert spec["properties"]["algorithm"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "Default: 100" in spec["properties"]["steps"]["description"]
