"""Time of a cross-stage read vs a local read under the pipeline-stage backend (2 gloo CPU processes).

    uv run --inexact --extra cpu python scratch/bench_pp_reads.py [model_path] [repeats]

Default model: a tiny random Llama (hidden 128, 3 layers) built locally; pass SmolLM2's cached HF
directory (``python -c "from nnterp.testing.smollm2 import smollm2_path; print(smollm2_path())"``) for a real one.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the maintainers' harness

from harness.distributed import bind, pp_out_of_order, pp_read_timings, run_on_ranks


def main() -> None:
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with tempfile.TemporaryDirectory() as workdir:
        if len(sys.argv) > 1:
            path = sys.argv[1]
        else:
            from nnterp.testing.tiny import build_tiny_model

            path = str(build_tiny_model("llama", f"{workdir}/llama").path)
        import transformers

        layers = transformers.AutoConfig.from_pretrained(path).num_hidden_layers
        split = layers // 2
        timings = run_on_ranks(bind(pp_read_timings, path=path, split=split, repeats=repeats), world_size=2)[1]
        for kind, seconds in timings.items():
            print(f"{kind:12} consumed read on stage 1: median {seconds * 1e3:.3f} ms over {repeats} traces")
        for rank, result in enumerate(run_on_ranks(bind(pp_out_of_order, path=path, split=split, timeout=3.0), world_size=2)):
            print(f"out of order, stage {rank}: {result['seconds']:.1f} s -> {result['error']}")


if __name__ == "__main__":
    main()
