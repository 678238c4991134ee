"""The copier's share of an extraction, without a model: the rows of 256 prompts x 32 generated tokens (a prefill
step of 100 tokens each, then one row per prompt per step, in a batch order that changes), written through
``RowCopier`` into the prompts' tensors, which are then dropped; several extractions through one copier (as an
engine's), so from the second on the blocks' memory is reused.

    uv run --inexact --extra cpu python scratch/bench_row_copier.py [--taps 16] [--runs 4] [--threads 4]
                                                                    [--keep-bytes 0]   (0: never reuse memory)

Prints, per extraction, the wall time from the first step to the last prompt's tensor, and the driving thread's
time in ``copy`` (the engine's own share). Steps are spaced by ``--step-ms`` of sleep (the engine's work).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nnterp.backends.taps.host_memory import BlockMemory  # noqa: E402
from nnterp.backends.taps.rows import PromptRows, RowCopier  # noqa: E402
from nnterp.backends.taps.transfer import HostTransfer  # noqa: E402


def extraction(copier: RowCopier, transfer: HostTransfer, taps: int, prompts: int, new: int, width: int,
               step_ms: float, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    rows = [PromptRows(100 + new - 1) for _ in range(prompts)]
    prefill = torch.randn(taps, prompts * 100, width).to(torch.bfloat16)
    decode = torch.randn(taps, prompts, width).to(torch.bfloat16)
    order = list(range(prompts))
    driving, start = 0.0, time.perf_counter()
    for step in range(new):
        began = time.perf_counter()
        if step == 0:
            items = [prompt.add(index * 100, 100, 0, f"prompt {index}") for index, prompt in enumerate(rows)]
            copier.copy(transfer.start(prefill), items)
        else:
            if step % 8 == 0:
                rng.shuffle(order)  # finished requests' places taken by others: the batch order changes
            items = [rows[index].add(row, 1, 99 + step, f"prompt {index}") for row, index in enumerate(order)]
            copier.copy(transfer.start(decode), items)
        driving += time.perf_counter() - began
        time.sleep(step_ms / 1e3)
    results = [copier.finish(prompt) for prompt in rows]
    for future in results:
        future.result()
    return time.perf_counter() - start, driving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taps", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--keep-bytes", type=int, default=None, help="memory kept for reuse (default: the copier's)")
    args = parser.parse_args()
    memory = BlockMemory(keep=args.keep_bytes) if args.keep_bytes is not None else None
    copier, transfer = RowCopier(args.threads, memory=memory), HostTransfer()
    for run in range(args.runs):
        wall, driving = extraction(copier, transfer, args.taps, args.prompts, args.new, args.width, args.step_ms, run)
        print(f"extraction {run}: {wall:.3f} s, driving thread {driving * 1e3:.1f} ms", flush=True)
    copier.close()


if __name__ == "__main__":
    main()
