"""The model registry: which bundles exist under `paths.models`, and the `current` alias.

`data/models/registry.json` is {"current": digest, "bundles": {digest: {registered_at,
backbone}}}. Bundles are folders named by their digest (`tasks.bundle.bundle`); promoting an
older one makes scoring use it again (a rollback), and no bundle is ever overwritten by
another model's weights.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from cxr.core.atomic import atomic_write_json
from cxr.core.errors import DataError
from tasks.bundle.bundle import Bundle, open_bundle

REGISTRY = "registry.json"
CURRENT = "current"


def read_registry(models_dir: Path) -> dict:
    path = Path(models_dir) / REGISTRY
    if not path.exists():
        return {CURRENT: None, "bundles": {}}
    try:
        registry = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"model registry is not valid JSON ({exc})", where=str(path)) from None
    if not isinstance(registry, dict) or not isinstance(registry.get("bundles"), dict):
        raise DataError("model registry has no bundles table (a registry of an older layout: register the model "
                        "again with `cxr train --stage fusion`)", where=str(path))
    return registry


def add_bundle(models_dir: Path, bundle: Bundle, *, make_current: bool = True) -> dict:
    """List `bundle` in the registry (and make it current); returns the registry."""
    registry = read_registry(models_dir)
    registry["bundles"][bundle.digest] = {
        "registered_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": bundle.manifest["backbone"]}
    if make_current:
        registry[CURRENT] = bundle.digest
    atomic_write_json(Path(models_dir) / REGISTRY, registry)
    return registry


def resolve_digest(models_dir: Path, ref: str | None = None) -> str:
    """The full digest that `ref` names: None or "current" -> the current alias, else a
    registered digest or a unique prefix of one (at least 6 hex digits)."""
    registry = read_registry(models_dir)
    where = str(Path(models_dir) / REGISTRY)
    if not registry["bundles"]:
        raise DataError("no registered model; train the fusion stage (it registers the model) before scoring", where=where)
    if ref in (None, CURRENT):
        if not registry.get(CURRENT):
            raise DataError("the registry has no current model; promote one with `cxr models promote DIGEST`", where=where)
        return registry[CURRENT]
    ref = ref.strip().lower()
    matches = [d for d in registry["bundles"] if d.startswith(ref)] if len(ref) >= 6 else []
    if len(matches) != 1:
        known = ", ".join(d[:12] for d in registry["bundles"])
        why = "is ambiguous" if matches else "is not a registered model"
        raise DataError(f"{ref!r} {why} (registered: {known})", where=where)
    return matches[0]


def load_bundle(models_dir: Path, ref: str | None = None) -> Bundle:
    """The verified bundle `ref` names (default: the current one)."""
    return open_bundle(Path(models_dir) / resolve_digest(models_dir, ref))


def promote(models_dir: Path, ref: str) -> Bundle:
    """Make the bundle `ref` names current, after verifying it; returns it."""
    bundle = load_bundle(models_dir, ref)
    registry = read_registry(models_dir)
    registry[CURRENT] = bundle.digest
    atomic_write_json(Path(models_dir) / REGISTRY, registry)
    return bundle


def list_bundles(models_dir: Path) -> list[dict]:
    """Every registered bundle, newest first: its summary, when it was registered, whether it
    is current, and why it cannot be used when it cannot (a missing or changed file)."""
    registry = read_registry(models_dir)
    out = []
    for digest, entry in registry["bundles"].items():
        item = {"digest": digest, "current": digest == registry.get(CURRENT), **entry}
        try:
            item.update(open_bundle(Path(models_dir) / digest, verify=False).summary())
            item["usable"] = True
        except DataError as exc:
            item.update(usable=False, problem=str(exc))
        out.append(item)
    return sorted(out, key=lambda i: i.get("registered_at") or "", reverse=True)
