"""``python -m tests.harness.sweep --update [--backend hf|vllm]`` (from the repository root): re-infer and rewrite
the reviewed layouts.

hf: builds every transformers causal-LM architecture as a tiny random model (plus SmolLM2-135M),
validates it, writes ``layouts/hf/<Architecture>.json`` for those that pass.
vllm: loads every architecture vLLM implements natively or runs through its Transformers backend (or the
given ones) on both backends, compares every accessor, writes ``layouts/vllm/<key>.json`` for those that
match (``<key>`` is the vLLM class, and for the Transformers backend ``<class>/<wrapped HF class>``).
Both record every status in ``layouts/<backend>/_validated.json`` and regenerate ``docs/architectures.md``.
Review the diff before committing.
"""

from __future__ import annotations

import argparse
import json
import threading

from nnterp.core.layout import LAYOUTS_DIR, ModelLayout, write_snapshot
from nnterp.testing.tiny import causal_lm_architectures

from .architectures import RESULTS_FILE, SMOLLM2
from .report import write_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite layouts/<backend> and docs/architectures.md")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--workers", type=int, default=2, help="architectures checked at once (hf only)")
    parser.add_argument("model_types", nargs="*", help="only these model types")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def keep(model_type: str, result: dict) -> None:
        """Record each result as it comes (a sweep runs for hours; an interrupted one keeps what it did)."""
        layout = result.pop("layout", None)
        result = {key: value for key, value in result.items() if key not in ("model_type", "seconds")}
        with lock:
            results[model_type] = result
            if args.update:
                if args.backend == "vllm" and result["status"] == "pass" and layout is not None:
                    write_snapshot(ModelLayout.from_json(layout))
                record({model_type: result}, args.backend)

    if args.backend == "hf":
        from .architectures import sweep

        sweep(args.model_types or [SMOLLM2, *causal_lm_architectures()], write_layout=args.update,
              workers=args.workers, on_result=keep)
    else:
        from .equivalence import sweep, vllm_model_types

        sweep(args.model_types or vllm_model_types(), on_result=keep)
    passed = sum(r["status"] == "pass" for r in results.values())
    print(f"{passed} passed, {len(results) - passed} failed")


def record(results: dict[str, dict], backend: str) -> None:
    """Merge ``results`` into ``layouts/<backend>/_validated.json`` and regenerate docs/architectures.md."""
    path = LAYOUTS_DIR / backend / RESULTS_FILE
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(merged.items())), indent=2) + "\n")
    write_page(LAYOUTS_DIR)


if __name__ == "__main__":
    main()
