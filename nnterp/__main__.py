"""``python -m nnterp``: check models from the command line.

``serve MODEL [vLLM serve arguments]``: vLLM's OpenAI-compatible server whose requests may carry standardized
interventions (docs/serving.md). ``validate <path or name> [--backend hf|vllm]``: every accessor of one model against independent references
(hf: a plain HuggingFace forward; vllm: StandardizedTransformer on the same weights), as a table, with where the
module layout came from. ``run_tests [-m NAME ...] [-c CLASS ...]``: the HF validation on the named models and on
tiny random models of the named transformers classes (by default: every class with a reviewed layout). Both exit
with status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

START = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - START:5.1f}s] {message}", file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def layout_origin(layout) -> str:
    """Whether ``layout`` matches its reviewed snapshot under ``layouts/``, differs from it, or has none."""
    from .core.layout import drift, load_snapshot, snapshot_path

    reviewed = load_snapshot(layout.backend, layout.architecture)
    if reviewed is None:
        return f"inferred from the model (no reviewed snapshot for {layout.architecture} on {layout.backend})"
    differences = drift(layout, reviewed)
    where = snapshot_path(layout.backend, layout.architecture)
    if differences:
        return f"inferred; DIFFERS from the reviewed snapshot {where}: " + "; ".join(differences)
    return f"reviewed snapshot {where} (inference agrees)"


def validate_hf(model_path: str) -> bool:
    say(f"loading {model_path} with StandardizedTransformer...")
    from .standardized import StandardizedTransformer
    from .validation import validate

    model = StandardizedTransformer(model_path, check_layout=False)
    say("running the checks against a plain HuggingFace forward...")
    report = validate(model)
    print(f"{model.layout.architecture} (hf): {model.num_layers} layers, hidden size {model.hidden_size}")
    print(f"layout: {layout_origin(model.layout)}\n")
    print(table(["check", "status", "detail"], [[c.name, c.status, c.detail] for c in report.checks]))
    return _verdict([c.status for c in report.checks])


def validate_vllm(model_path: str) -> bool:
    say(f"loading {model_path} with StandardizedTransformer, then StandardizedVLLM (float32)...")
    from .core.layout import ModelLayout
    from .validation import check_vllm_against_hf, within_tolerance

    result = check_vllm_against_hf(model_path)
    if "layout" not in result:
        print(f"FAIL: {result['reason']}")
        return False
    print(f"{result['architecture']} (vllm, {result['engine']} vLLM model)")
    print(f"layout: {layout_origin(ModelLayout.from_json(result['layout']))}\n")
    rows, statuses = [], []
    for name, absolute in result["max_abs_diff"].items():
        relative = result["max_rel_diff"][name]
        statuses.append("pass" if within_tolerance({"abs": absolute, "rel": relative}) else "fail")
        rows.append([f"{name} == HF", statuses[-1], f"max diff {absolute:.2e} (relative {relative:.2e})"])
    generations = result["generations"]
    statuses.append("pass" if generations["hf"] == generations["vllm"] else "fail")
    rows.append(["greedy generations (plain, steered) == HF", statuses[-1], "" if statuses[-1] == "pass" else str(generations)])
    print(table(["check", "status", "detail"], rows))
    return _verdict(statuses)


def _verdict(statuses: Sequence[str]) -> bool:
    counts = {status: statuses.count(status) for status in ("pass", "fail", "n/a")}
    print(f"\n{'PASS' if counts['fail'] == 0 else 'FAIL'}: {counts['pass']} passed, {counts['fail']} failed"
          + (f", {counts['n/a']} not applicable" if counts["n/a"] else ""))
    return counts["fail"] == 0


def model_types_of(class_names: Sequence[str]) -> list[str]:
    """transformers model types for class names (``LlamaForCausalLM``) or model types (``llama``)."""
    from .testing.tiny import causal_lm_architectures

    architectures = causal_lm_architectures()
    by_class = {architecture: model_type for model_type, architecture in architectures.items()}
    unknown = [name for name in class_names if name not in by_class and name not in architectures]
    if unknown:
        raise SystemExit(f"not a transformers causal-LM class or model type: {unknown} "
                         f"(e.g. {sorted(by_class)[:3]} or {sorted(architectures)[:3]})")
    return [by_class.get(name, name) for name in class_names]


def reviewed_model_types() -> list[str]:
    """Model types whose tiny model passed the last sweep (those with a reviewed HF layout)."""
    import json

    from .core.layout import LAYOUTS_DIR, RESULTS_FILE
    from .testing.smollm2 import SMOLLM2

    results = json.loads((LAYOUTS_DIR / "hf" / RESULTS_FILE).read_text())
    return [model_type for model_type, result in results.items() if result["status"] == "pass" and model_type != SMOLLM2]


def run_tests(model_names: Sequence[str] | None, class_names: Sequence[str] | None) -> bool:
    rows = []
    for name in model_names or []:
        try:
            status = "pass" if validate_hf(name) else "fail"
            rows.append([name, status, "see its table above" if status == "fail" else ""])
        except Exception as error:  # one model's failure is reported, the others still run
            rows.append([name, "fail", f"{type(error).__name__}: {error}".splitlines()[0][:160]])
        print()
    if class_names or not model_names:
        model_types = model_types_of(class_names) if class_names else reviewed_model_types()
        say(f"validating tiny random models of {len(model_types)} architecture(s), one process each...")
        with tempfile.TemporaryDirectory() as workdir:
            rows += [validate_tiny(model_type, Path(workdir)) for model_type in model_types]
    print(table(["model", "status", "failing checks"], rows))
    return _verdict([row[1] for row in rows])


def validate_tiny(model_type: str, workdir: Path, timeout: float = 600) -> list[str]:
    """``[model, status, failing checks]`` of the tiny random model of ``model_type``, validated by
    ``python -m nnterp validate`` in a child process (a crash or a hang fails this entry only)."""
    from .testing.tiny import build_tiny_model, causal_lm_architectures

    label = f"tiny {model_type} ({causal_lm_architectures().get(model_type) or '-'})"
    try:
        path = build_tiny_model(model_type, workdir / model_type).path
        run = subprocess.run([sys.executable, "-m", "nnterp", "validate", str(path)], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [label, "fail", f"no verdict within {timeout:.0f} s"]
    except Exception as error:
        return [label, "fail", f"{type(error).__name__}: {error}".splitlines()[0][:160]]
    if run.returncode == 0:
        return [label, "pass", ""]
    failing = [line.split("  ")[0] for line in run.stdout.splitlines() if "  fail" in line]
    last_line = ((run.stdout + run.stderr).strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    return [label, "fail", (", ".join(failing) or last_line)[:160]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnterp", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="check every accessor of one model against independent references")
    check.add_argument("model", help="a local directory or a HuggingFace model name")
    check.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    tests = commands.add_parser("run_tests", help="validate named models and tiny models of transformers classes")
    tests.add_argument("--model-names", "-m", nargs="+", help="models to validate (local directories or HuggingFace names)")
    tests.add_argument("--class-names", "-c", nargs="+", help="transformers classes (LlamaForCausalLM) or model types (llama)")
    served = commands.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with standardized interventions on requests (docs/serving.md)",
        description="nnterp serve MODEL [vLLM serve arguments]: loopback by default, --api-key to require a key.")
    served.add_argument("model", help="a local model directory (or a name in the HuggingFace cache)")
    served.add_argument("vllm_arguments", nargs=argparse.REMAINDER, help="passed to `vllm serve`")
    args = parser.parse_args(argv)
    if args.command == "serve":  # vLLM's server, its own logging and errors
        from .backends.vllm.server import serve

        return serve(args.model, args.vllm_arguments)

    import warnings

    warnings.filterwarnings("ignore")
    try:
        if args.command == "validate":
            passed = (validate_vllm if args.backend == "vllm" else validate_hf)(args.model)
        else:
            passed = run_tests(args.model_names, args.class_names)
    except Exception as error:  # one line, not a traceback (NNTERP_TRACEBACK=1 shows it)
        if os.environ.get("NNTERP_TRACEBACK"):
            raise
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0 if passed else 1


def one_line(error: BaseException, limit: int = 400) -> str:
    """An exception as ``Type: message`` on one line."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {message}"[:limit]


if __name__ == "__main__":
    sys.exit(main())
