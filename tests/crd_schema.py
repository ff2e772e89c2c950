"""Objects of custom resources (KServe, Volcano, the training operator) validated against their
projects' published CRD schemas in ../shared/crds (data, never copied into the repository),
with unknown fields refused where the schema does not preserve them, as the API server
refuses them on `kubectl apply`. A test that needs them skips with a reason when ../shared
is absent."""
import copy
import functools
from pathlib import Path

import pytest
import yaml

CRDS = Path(__file__).resolve().parents[2] / "shared" / "crds"


@functools.cache
def _schemas():
    """(group, kind, version) -> openAPIV3Schema, from every CRD file there."""
    found = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                found[(spec["group"], spec["names"]["kind"], version["name"])] = version["schema"]["openAPIV3Schema"]
    return found


def _strict(schema):
    """The schema with additionalProperties: false wherever it lists properties and neither
    preserves unknown fields nor says what extra properties may be."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    # metadata is the API server's to check (the CRDs declare it as a bare object).
    if "metadata" in schema.get("properties", {}):
        schema["properties"]["metadata"] = {"type": "object"}
    return schema


def validate(doc) -> None:
    """Raise AssertionError naming the first field the CRD refuses."""
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip("no CRD schemas: ../shared/crds is absent")
    group, version = doc["apiVersion"].split("/")
    key = (group, doc["kind"], version)
    assert key in _schemas(), "no CRD for %s %s in %s" % (doc["apiVersion"], doc["kind"], CRDS)
    validator = jsonschema.Draft7Validator(_strict(_schemas()[key]))
    errors = sorted(validator.iter_errors(doc), key=lambda e: str(list(e.path)))
    assert not errors, "%s %s: %s at %s" % (doc["kind"], doc["metadata"]["name"], errors[0].message,
                                             "/".join(map(str, errors[0].absolute_path)))
