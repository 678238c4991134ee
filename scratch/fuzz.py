"""Differential fuzzing of the standardized surface, as many cases as asked (``tests/differential.py``).

    uv run --inexact python scratch/fuzz.py --cases 500 [--seed 0] [--architectures llama,falcon]
    uv run --inexact python scratch/fuzz.py --cases 60 --vllm llama,gpt2   # also vLLM vs HF, 60 per architecture

(``--vllm`` needs a vLLM engine in the environment, e.g. vLLM's CPU build.)
Each HF case runs a random trace program through StandardizedTransformer and compares every read with
forward hooks on the raw model (the same batch, and each prompt alone), and every fourth also generates its
prompts as a batch against each prompt's own greedy decode, and every fourth (another) extracts them
(``model.extract``, random accessors, layers and generated tokens) against each prompt's tokens alone; vLLM cases
compare StandardizedVLLM with each prompt run alone on HF, every fourth right after a trace during which one of
vLLM's modules failed, and every fourth (another) extracts too. Prints a summary and the first mismatches (each with
the case, which reproduces with ``make_case(seed, architecture, surface)``); exits 1 if any.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from differential import (  # noqa: E402
    HF_ARCHITECTURES, alone_references, check_extraction_case, check_hf_case, check_hf_generation, check_vllm_case,
    failing_trace, make_case, summarize, surface_of,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200, help="HF cases in all (round-robin over architectures)")
    parser.add_argument("--seed", type=int, default=0, help="first case seed")
    parser.add_argument("--architectures", default=",".join(HF_ARCHITECTURES))
    parser.add_argument("--vllm", default="", help="architectures to also fuzz on vLLM (one engine at a time)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    from nnterp import StandardizedTransformer
    from nnterp.testing.tiny import build_tiny_model

    transformers.logging.set_verbosity_error()
    architectures = [a for a in args.architectures.split(",") if a]
    start, failed = time.time(), False
    with tempfile.TemporaryDirectory() as workdir:
        paths = {a: str(build_tiny_model(a, Path(workdir) / a).path)
                 for a in {*architectures, *filter(None, args.vllm.split(","))}}
        loaded: dict = {}
        surfaces: dict = {}

        def model(architecture: str, dtype: torch.dtype):
            if (architecture, dtype) not in loaded:
                loaded[architecture, dtype] = StandardizedTransformer(paths[architecture], check_layout=False, dtype=dtype)
                surfaces.setdefault(architecture, surface_of(loaded[architecture, dtype]))
            return loaded[architecture, dtype]

        results, errors = [], []
        for number in range(args.cases):
            architecture = architectures[number % len(architectures)]
            try:
                model(architecture, torch.float32)
                case = make_case(args.seed + number, architecture, surfaces[architecture])
                found, worst = check_hf_case(model(architecture, case.dtype), case)
                if number % 4 == 0:  # batched greedy generation of the same prompts against each prompt alone
                    found += check_hf_generation(model(architecture, torch.float32), case)[0]
                if number % 4 == 2:  # model.extract of the same prompts against each prompt's tokens alone
                    hf = model(architecture, torch.float32)
                    found += check_extraction_case(hf, hf, surfaces[architecture], case)[0]
            except Exception as error:  # reported with the case, the run goes on
                errors.append(f"{architecture} case {args.seed + number}: {type(error).__name__}: {str(error)[:300]}")
                continue
            results.append((case, found, worst))
        print(f"HF: {summarize(results)}\n({time.time() - start:.0f} s)", flush=True)
        print("\n".join([f"{len(errors)} cases raised:", *errors[:20]]) if errors else "no case raised", flush=True)
        failed = bool(errors) or any(found for _, found, _ in results)
        for architecture in filter(None, args.vllm.split(",")):
            failed |= fuzz_vllm(architecture, paths[architecture], model(architecture, torch.float32), args)
    return 1 if failed else 0


def fuzz_vllm(architecture: str, path: str, hf_model, args) -> bool:
    """The HF references first: vLLM's Transformers backend patches the HF classes it wraps."""
    from nnterp.standardized.vllm import StandardizedVLLM

    start = time.time()
    surface = surface_of(hf_model)
    cases = [make_case(args.seed + number, architecture, surface, one_prompt_per_invoke=True, dtypes=(torch.float32,))
             for number in range(args.cases)]
    references = [alone_references(hf_model, case) for case in cases]
    vllm_model = StandardizedVLLM(path, dtype="float32", max_model_len=128, max_num_seqs=4)
    results = []
    for number, (case, expected) in enumerate(zip(cases, references)):
        if number % 4 == 1:  # one of vLLM's modules fails during a trace first: the engine must serve the case
            try:
                failing_trace(vllm_model, case)
            except RuntimeError as error:
                if "forward pass raised" not in str(error):
                    raise
        found, worst = check_vllm_case(vllm_model, case, expected)
        if number % 4 == 2:  # extraction of the case's prompts against each prompt's tokens alone on HF
            found += check_extraction_case(vllm_model, hf_model, surface, case, engine_sampling=True)[0]
        results.append((case, found, worst))
    print(f"vLLM {architecture}: {summarize(results)}\n({time.time() - start:.0f} s)", flush=True)
    del vllm_model
    return any(found for _, found, _ in results)


if __name__ == "__main__":
    sys.exit(main())
