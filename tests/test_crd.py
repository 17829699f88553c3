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


def test_every_spec_field_but_the_mutable_ones_is_immutable():
    # A field added to the spec is immutable unless it is listed as one a running job follows.
    from kubeforge import spec as s
    from kubeforge.crd import MUTABLE, MUTABLE_ROLE_FIELDS, immutable_paths

    guarded = {".".join(path) for path, _ in immutable_paths()}
    expected = set()
    for name, field in s.RLJobSpec.model_fields.items():
        key = field.alias or name
        if key == "roles":
            for role_name, role in s.Roles.model_fields.items():
                role_key = role.alias or role_name
                if role_key not in MUTABLE_ROLE_FIELDS:
                    expected.add(f"roles.{role_key}")
                    continue
                for f_name, f in role.annotation.model_fields.items():
                    if (f.alias or f_name) not in MUTABLE_ROLE_FIELDS[role_key]:
                        expected.add(f"roles.{role_key}.{f.alias or f_name}")
        elif key not in MUTABLE:
            expected.add(key)
    assert guarded == expected
    assert "roles.generator.replicas" not in guarded and "suspend" not in guarded
    # Each has a rule on spec (added or removed, or a scalar against its default), naming it.
    spec = crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    messages = [r["message"] for r in spec["x-kubernetes-validations"]]
    assert sorted(m.split(" cannot change")[0] for m in messages) == sorted(f"spec.{p}" for p in guarded)
    # A value the API server reads in place (`self == oldSelf` on the field) is bounded, or the CEL cost
    # estimate refuses the CRD (e2e/test_operator.py installs it on a real API server).
    model = spec["properties"]["model"]
    assert model["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    assert model["properties"]["path"]["maxLength"] > 0
    assert spec["properties"]["volumes"]["maxItems"] > 0 and spec["properties"]["env"]["maxProperties"] > 0
