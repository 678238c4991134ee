"""``python -m nnterp.layout --update``: re-infer and rewrite the reviewed layouts and the README table.

Builds every transformers causal-LM architecture as a tiny random model (plus SmolLM2-135M), validates
it, writes ``layouts/hf/<Architecture>.json`` for those that pass, ``layouts/hf/_validated.json`` with
the status of all, and regenerates the README's architecture table. Review the diff before committing.
"""

from __future__ import annotations

import argparse
import json

from ..testing.architectures import RESULTS_FILE, SMOLLM2, sweep
from ..testing.report import write_readme_table
from ..testing.tiny import causal_lm_architectures
from .snapshot import LAYOUTS_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="rewrite layouts/hf and the README table")
    parser.add_argument("model_types", nargs="*", help="only these model types (default: all + SmolLM2)")
    args = parser.parse_args()
    model_types = args.model_types or [SMOLLM2, *causal_lm_architectures()]
    results = sweep(model_types, write_layout=args.update)
    if args.update:
        path = LAYOUTS_DIR / "hf" / RESULTS_FILE
        previous = json.loads(path.read_text()) if path.exists() else {}
        previous.update({r["model_type"]: {k: v for k, v in r.items() if k not in ("model_type", "seconds")} for r in results})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(previous.items())), indent=2) + "\n")
        write_readme_table(previous)
    passed = sum(r["status"] == "pass" for r in results)
    print(f"{passed} passed, {len(results) - passed} failed")


if __name__ == "__main__":
    main()
