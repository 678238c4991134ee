"""Build, load and validate one architecture; the sweep over all of them, isolated per process."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

from .isolation import run_isolated
from nnterp.core.layout import RESULTS_FILE
from nnterp.testing.smollm2 import SMOLLM2
from nnterp.testing.tiny import build_tiny_model, causal_lm_architectures
from nnterp.validation.vllm import error_reason



def check_architecture(model_type: str, workdir: str | Path | None = None, write_layout: bool = False) -> dict:
    """Validate ``model_type`` (or ``SMOLLM2``); returns a JSON-able result with the failing checks."""
    from nnterp.core.layout import write_snapshot
    from nnterp.standardized import StandardizedTransformer
    from nnterp.validation import validate

    warnings.filterwarnings("ignore")
    start = time.time()
    result = {"model_type": model_type, "architecture": causal_lm_architectures().get(model_type), "status": "fail", "reason": ""}
    try:
        if model_type == SMOLLM2:
            from nnterp.testing.smollm2 import smollm2_path

            path = smollm2_path()
        else:
            directory = Path(workdir or tempfile.mkdtemp()) / model_type
            path = build_tiny_model(model_type, directory).path
        model = StandardizedTransformer(str(path), check_layout=False)
        result["architecture"] = model.layout.architecture
        report = validate(model)
        result["status"] = "pass" if report.passed else "fail"
        result["reason"] = "; ".join(f"{c.name} ({c.detail})" for c in report.failures())
        if report.passed and write_layout:
            write_snapshot(model.layout)
    except Exception as error:  # a sweep records why an architecture fails instead of stopping
        result["reason"] = error_reason(error)
    result["seconds"] = round(time.time() - start, 1)
    return result


def sweep(model_types: list[str], write_layout: bool, timeout: int = 300, workers: int = 2,
          on_result: Callable[[str, dict], None] | None = None) -> list[dict]:
    """Run ``check_architecture`` for each model type in a forked child (a crash fails one entry only);
    ``on_result(model_type, result)`` is called as each one finishes."""
    from concurrent.futures import ThreadPoolExecutor

    import nnsight  # noqa: F401  (imported once here, inherited by every forked child)

    from nnterp.standardized import StandardizedTransformer  # noqa: F401

    def check(model_type: str) -> dict:
        result = _check_in_child(model_type, workdir, write_layout, timeout)
        if on_result is not None:
            on_result(model_type, result)
        return result

    with tempfile.TemporaryDirectory() as workdir, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(check, model_types))


def _check_in_child(model_type: str, workdir: str, write_layout: bool, timeout: int) -> dict:
    result = run_isolated(check_architecture, (model_type, workdir, write_layout), timeout)
    result.setdefault("model_type", model_type)
    result.setdefault("architecture", causal_lm_architectures().get(model_type))
    print(f"{result['status']:4} {model_type} {result.get('reason', '')[:120]}", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    model_type, workdir = sys.argv[1], sys.argv[2]
    print(json.dumps(check_architecture(model_type, workdir, write_layout="--write-layout" in sys.argv)))
