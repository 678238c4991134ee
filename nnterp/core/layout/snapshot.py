"""Reviewed layout snapshots on disk: ``layouts/<backend>/<Architecture>.json``."""

from __future__ import annotations

import json
from pathlib import Path

from .model_layout import ModelLayout

LAYOUTS_DIR = Path(__file__).resolve().parents[3] / "layouts"
# Per backend, the status of every architecture the last sweep checked (``layouts/<backend>/_validated.json``).
RESULTS_FILE = "_validated.json"


def snapshot_path(backend: str, architecture: str, root: Path = LAYOUTS_DIR) -> Path:
    return root / backend / f"{architecture}.json"


def load_snapshot(backend: str, architecture: str, root: Path = LAYOUTS_DIR) -> ModelLayout | None:
    path = snapshot_path(backend, architecture, root)
    if not path.exists():
        return None
    return ModelLayout.from_json(json.loads(path.read_text()))


def write_snapshot(layout: ModelLayout, root: Path = LAYOUTS_DIR) -> Path:
    path = snapshot_path(layout.backend, layout.architecture, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(layout.to_json(), indent=2, sort_keys=True) + "\n")
    return path


def drift(inferred: ModelLayout, reviewed: ModelLayout) -> list[str]:
    """Human-readable differences between an inferred layout and its reviewed snapshot."""
    new, old = inferred.to_json(), reviewed.to_json()
    differences = []
    for key in sorted(set(new) | set(old)):
        if key == "modules":
            for module in sorted(set(new[key]) | set(old[key])):
                if new[key].get(module) != old[key].get(module):
                    differences.append(f"{module}: reviewed {old[key].get(module)} != inferred {new[key].get(module)}")
        elif new.get(key) != old.get(key):
            differences.append(f"{key}: reviewed {old.get(key)} != inferred {new.get(key)}")
    return differences
