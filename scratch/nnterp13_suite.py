"""Run nnterp 1.3.0's own test suite (shipped in its PyPI wheel as ``nnterp/tests``) against this nnterp, on tiny
random models built locally (its suite names hub models; here they are replaced by local directories).

    uv run --inexact --extra cpu python scratch/nnterp13_suite.py [--workdir DIR] [model types ...]

Downloads the nnterp==1.3.0 wheel from PyPI (the package index), unpacks its tests beside a copy of its test
configuration whose model lists name the local models, and runs pytest on them with a small plugin that
gives the suite the ``nnterp.data`` folder and xdist hook it expects. Prints pytest's summary and the failures
grouped by test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path

MODEL_TYPES = ("bloom", "cohere", "falcon", "gemma", "gemma2", "gpt2", "gpt_neox", "gptj", "llama", "llama4_text",
               "mistral", "mixtral", "olmo2", "opt", "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3",
               "qwen3_moe", "stablelm")
LLAMA_LIKE = {"cohere", "gemma", "gemma2", "llama", "llama4_text", "mistral", "mixtral", "olmo2", "phi3", "phimoe",
              "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "stablelm"}  # modules under model.layers, as 1.3 lists them

PLUGIN = '''"""Gives nnterp 1.3.0's suite the ``nnterp.data`` folder and the xdist hook its conftest implements."""
import importlib.util
import pathlib
import sys

data = pathlib.Path(__file__).parent / "data"
spec = importlib.util.spec_from_file_location("nnterp.data", data / "__init__.py", submodule_search_locations=[str(data)])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["nnterp.data"] = module


class XdistHooks:
    def pytest_testnodedown(self, node, error):
        """xdist's hook (its conftest implements it)."""


def pytest_addhooks(pluginmanager):
    if not pluginmanager.has_plugin("xdist"):
        pluginmanager.add_hookspecs(XdistHooks)
'''


def unpack_suite(workdir: Path) -> Path:
    wheels = workdir / "wheel"
    base_python = Path(sys.base_prefix) / "bin" / "python3"  # the project's venv has no pip
    subprocess.run([str(base_python), "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels),
                    "nnterp==1.3.0"], check=True)
    wheel = next(wheels.glob("nnterp-1.3.0-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith("nnterp/tests/"):
                target = workdir / "legacy13" / name.removeprefix("nnterp/")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
    (workdir / "legacy13" / "__init__.py").write_text("")
    return workdir / "legacy13" / "tests"


def configure(workdir: Path, tests: Path, models: dict[str, Path]) -> None:
    import yaml

    config_path = tests / "test_config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["llama_like_models"] = sorted(str(path) for model_type, path in models.items() if model_type in LLAMA_LIKE)
    config["core_test_models"] = sorted(str(path) for model_type, path in models.items() if model_type not in LLAMA_LIKE)
    config_path.write_text(yaml.safe_dump(config))
    data = workdir / "legacy13" / "data"
    data.mkdir(exist_ok=True)
    (data / "toy_models_cache.json").write_text(json.dumps({"timestamp": datetime.datetime.now().isoformat(), "models": []}))
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "data" / "__init__.py").write_text("")
    (workdir / "legacy13_plugin.py").write_text(PLUGIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("model_types", nargs="*", default=list(MODEL_TYPES))
    args = parser.parse_args()
    from nnterp.testing.tiny import build_tiny_model

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="nnterp13-"))
    tests = unpack_suite(workdir)
    models = {model_type: build_tiny_model(model_type, workdir / "models" / model_type).path for model_type in args.model_types}
    configure(workdir, tests, models)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(workdir)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "legacy13_plugin", "-p", "no:cacheprovider", "-q", "-rf",
                          str(tests), "--model-names", *map(str, models.values())], cwd=workdir, capture_output=True,
                         text=True, env={**__import__("os").environ, **env})
    lines = run.stdout.splitlines()
    print("\n".join(lines[-1:]))
    failed = Counter(line.split("::")[-1].split("[")[0] for line in lines if line.startswith("FAILED"))
    for test, count in failed.most_common():
        print(f"{count:4} failed  {test}")


if __name__ == "__main__":
    main()
