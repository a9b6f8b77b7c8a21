"""values.yaml is documented key by key, typed by values.schema.json, and the README table is current."""

from __future__ import annotations

import importlib.util
import json
import sys
from typing import Any

import pytest
import yaml

from tests.helm.manifests import CHART


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("gen_values_table", CHART / "ci" / "gen_values_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def leaf_paths(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key of values.yaml, list entries as `[]`."""
    if isinstance(node, dict):
        paths = []
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.append(path)
            if isinstance(value, dict) and value and not _free_form(path):
                paths += leaf_paths(value, path)
            elif isinstance(value, list) and value and isinstance(value[0], dict):
                paths += leaf_paths(value[0], path + "[]")
        return paths
    return []


def _free_form(path: str) -> bool:
    # Maps handed to Kubernetes as they are (resources, selectors, labels): one comment covers them.
    return path.rsplit(".", 1)[-1] in {"resources", "namespaceSelector", "podSelector", "nodeSelector",
                                      "affinity", "annotations", "labels", "commonLabels", "rayStartParams"}


def test_documents_every_value_with_a_comment_when_values_yaml_is_read() -> None:
    gen = generator()
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    documented = {row.path for row in gen.documented_keys(text)}
    # A key holding a block of other keys (a section such as `router.limits`) needs no comment of its own.
    sections = {p for p in leaf_paths(values) if isinstance(gen.value_at(values, p), dict) and not _free_form(p)}
    missing = [p for p in leaf_paths(values) if p not in documented and p not in sections]
    assert missing == []


def test_types_every_value_in_the_schema_when_values_yaml_is_read() -> None:
    gen = generator()
    schema = json.loads((CHART / "values.schema.json").read_text())
    for path in leaf_paths(yaml.safe_load((CHART / "values.yaml").read_text())):
        node = gen.schema_at(schema, path)
        assert "type" in node or "anyOf" in node, f"{path} has no type in values.schema.json"


def test_closes_every_section_of_the_schema_when_a_key_is_misspelt() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())

    def walk(node: dict[str, Any], where: str) -> None:
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{where or '/'} accepts unknown keys"
            for key, child in node["properties"].items():
                walk(child, f"{where}/{key}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")

    walk(schema, "")
    for name, node in schema["definitions"].items():
        walk(node, f"#/definitions/{name}")


def test_readme_values_table_matches_values_yaml_when_generated() -> None:
    gen = generator()
    readme = (CHART / "README.md").read_text()
    wanted = gen.readme_with_table(readme, gen.table((CHART / "values.yaml").read_text(),
                                                     json.loads((CHART / "values.schema.json").read_text())))
    assert readme == wanted, "README.md's values table is stale: run `python helm/moe-cluster/ci/gen_values_table.py`"
    assert gen.main(["--check"]) == 0


def test_generator_refuses_a_key_without_a_comment_when_one_is_added() -> None:
    text = (CHART / "values.yaml").read_text() + "\nextra:\n  undocumented: 1\n"
    gen = generator()
    with pytest.raises(gen.UndocumentedKey, match=r"extra\.undocumented"):
        gen.documented_keys(text)
