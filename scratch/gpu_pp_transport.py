"""The cross-stage transport with values on a GPU: two processes on one GPU (a gloo group, no NCCL), each a
pipeline stage of a HuggingFace model (the other stage's layers are vLLM's PPMissingLayer stubs).

    python3 scratch/gpu_pp_transport.py [model_path]     (on a machine with a GPU; default: a tiny random Llama)

Checks that values published from CUDA tensors arrive intact (a 24 MiB one, bfloat16, several in one request),
that the two stages reproduce one process's saves, and times a consumed cross-stage read against a local one.
"""

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch

from harness.distributed import PP_PROMPT, bind, pp_read_timings, pp_trace, run_on_ranks, transport_transfers


def main() -> None:
    from nnterp.backends.distributed.pp import merge_stage_saves
    from nnterp.standardized import StandardizedTransformer

    with tempfile.TemporaryDirectory() as workdir:
        if len(sys.argv) > 1:
            path = sys.argv[1]
        else:
            from nnterp.testing.tiny import build_tiny_model

            path = str(build_tiny_model("llama", f"{workdir}/llama").path)
        transfers = run_on_ranks(bind(transport_transfers, device="cuda"), world_size=3)
        for rank, consumer in enumerate(transfers[1:], 1):
            same = all(torch.equal(consumer["values"][key], value) for key, value in transfers[0]["values"].items())
            print(f"rank {rank}: values from CUDA tensors intact: {same}; dropped value: {consumer['dropped'][:60]}")
        print(f"holder after release: {transfers[0]['held_bytes_after']} bytes held")

        model = StandardizedTransformer(path, check_layout=False, device_map="cuda")
        with torch.no_grad(), model.trace(PP_PROMPT):
            model.layers_output[0] = model.layers_output[0] * 2
            first, last = model.layers_output[0].save(), model.layers_output[-1].save()
        split = model.num_layers // 2 or 1
        stages = run_on_ranks(bind(pp_trace, path=path, split=split, device="cuda"), world_size=2)
        merged = merge_stage_saves([stage["saves"] for stage in stages])
        print(f"two stages on cuda vs one process: first {float((merged['first'].cpu() - first.cpu()).abs().max()):.3g}, "
              f"last {float((merged['last'].cpu() - last.cpu()).abs().max()):.3g}")
        timings = run_on_ranks(bind(pp_read_timings, path=path, split=split, repeats=20, device="cuda"), world_size=2)[1]
        for kind, seconds in timings.items():
            print(f"{kind:12} consumed read on stage 1 (cuda): median {seconds * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
