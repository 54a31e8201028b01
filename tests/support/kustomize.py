"""Just enough of `kustomize build` to validate deploy/kubernetes without the kustomize binary:
resources (files and directories), `replicas`, `images`, and secret/configMap generators from
literals.
Any other kustomization field is refused, so a manifest never silently goes unchecked."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import yaml

SUPPORTED = {
    "apiVersion", "kind", "resources", "replicas", "images", "secretGenerator",
    "configMapGenerator",
}


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _generated(kind: str, generator: dict[str, Any]) -> dict[str, Any]:
    pairs = dict(literal.split("=", 1) for literal in generator.get("literals", []))
    resource: dict[str, Any] = {
        "apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]},
    }
    if kind == "Secret":
        resource["type"] = "Opaque"
        resource["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in pairs.items()}
    else:
        resource["data"] = pairs
    return resource


def build(directory: Path) -> list[dict[str, Any]]:
    """The resources `kustomize build directory` emits (generated names without hash suffix)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields not rendered here: {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        resources += build(target) if target.is_dir() else load_documents(target)
    for generator in kustomization.get("secretGenerator", []):
        resources.append(_generated("Secret", generator))
    for generator in kustomization.get("configMapGenerator", []):
        resources.append(_generated("ConfigMap", generator))
    for replica in kustomization.get("replicas", []):
        matches = [
            r for r in resources
            if r["metadata"]["name"] == replica["name"] and "replicas" in r.get("spec", {})
        ]
        if len(matches) != 1:
            raise ValueError(f"{directory}: replicas for {replica['name']!r} match {len(matches)}")
        matches[0]["spec"]["replicas"] = replica["count"]
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    return resources


def _set_image(resources: list[dict[str, Any]], image: dict[str, str]) -> None:
    """`kustomize edit set image NAME=NEW:TAG`: rewrite containers whose image is NAME[:tag]."""
    for resource in resources:
        pod = resource.get("spec", {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            name, _, tag = container["image"].partition(":")
            if name == image["name"]:
                tag = image.get("newTag", tag)
                container["image"] = image.get("newName", name) + (f":{tag}" if tag else "")


def secret_env(resources: list[dict[str, Any]], name: str) -> dict[str, str]:
    """Decoded data of the Secret called `name`, or {} when there is none (optional envFrom)."""
    for resource in resources:
        if resource["kind"] == "Secret" and resource["metadata"]["name"] == name:
            return {k: base64.b64decode(v).decode() for k, v in resource.get("data", {}).items()}
    return {}
