"""Where the time of StandardizedVLLM's graph-captured modes goes: cProfile of one warm run of each mode of
``scratch/bench_throughput.py`` (the engine core runs in this process, so the worker's Python is profiled too).

    python3 scratch/profile_graphs.py [--model random-1b] [--scenario 256:32] [--modes generate extract steer]
                                      [--cuda-graphs true] [--top 25]     (GPU machine)
    python3 scratch/profile_graphs.py --vanilla [--scenario 256:32]            (vanilla vLLM, its default graphs)

Prints, per mode: the best unprofiled wall time of ``--repeats`` runs split into the engine's steps (count, seconds)
and everything else (RPCs to the worker and the requests' submission counted apart, and extraction's own client-side
parts); the wall time of the parts of those steps (scheduler, model runner, output processing), timed at their entry
points over one more run; then a cProfile of one run, the functions with the most own time and nnterp's functions
with the most inclusive time. ``--segments`` times, over one more run, each segment of the replayed graphs on the
host (graph launches, eager breaks by what they call). ``--vanilla`` profiles vanilla vLLM with the same engine
settings instead (mode ``generate``), the baseline to read the others against; ``--gc-off`` turns Python's garbage
collector off while the modes run. Mode ``extract-copier`` is ``extract`` with the rows copied to host memory and
written by the copier's threads rather than by the GPU (what ``extract`` does on a GPU that cannot map host memory),
``extract-all-copier`` the same for ``extract-all``; for these alone, ``--no-copies`` leaves out the copier threads'
writes of extracted rows (the rows are then garbage), to tell what they cost the engine's thread from what its own
extraction work does, and ``--copier-threads N`` gives the copier N threads. Modes may repeat (``--modes generate
extract extract-copier generate extract extract-copier``) to compare them in turns.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="random-1b")
    parser.add_argument("--scenario", default="256:32")
    parser.add_argument("--modes", nargs="+", default=["generate", "extract", "extract-all", "steer"])
    parser.add_argument("--cuda-graphs", default="true", help="true, false or comma-separated accessors")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segments", action="store_true",
                        help="host time of the replayed graphs' segments: graph launches and eager breaks by kind")
    parser.add_argument("--torch-profiler", action="store_true",
                        help="also PyTorch's profiler: the CUDA runtime calls (synchronizations, host allocations) by time")
    parser.add_argument("--vanilla", action="store_true", help="vanilla vLLM with its default CUDA graphs")
    parser.add_argument("--no-copies", action="store_true",
                        help="extract-copier without the copier threads' writes (its rows are then wrong)")
    parser.add_argument("--gc-off", action="store_true", help="Python's garbage collector off while the modes run")
    parser.add_argument("--copier-threads", type=int, default=None,
                        help="extract-copier's copier threads (default: its own)")
    args = parser.parse_args()
    if args.gc_off:
        import gc

        gc.disable()
    if args.no_copies:
        import nnterp.backends.taps.rows as rows

        rows._write_blocks = lambda buffer, groups: None
    if args.copier_threads:
        import nnterp.backends.taps.rows as rows

        default_init = rows.RowCopier.__init__
        rows.RowCopier.__init__ = lambda self, threads=None: default_init(self, args.copier_threads)
    import bench_throughput as bench
    from transformers import AutoTokenizer

    settings = argparse.Namespace(max_model_len=1024, max_num_seqs=256, max_batched_tokens=32768, dtype="bfloat16")
    path = bench.model_path(args.model, Path(os.environ.get("NNTERP_BENCH_CACHE", "/tmp/nnterp-bench")))
    graphs = {"true": True, "false": False}.get(args.cuda_graphs.lower(), tuple(args.cuda_graphs.split(",")))
    if args.vanilla:
        modes = {"m-generate": bench.vllm_group(settings, path, graphs=True)["vllm-graphs"]}
        args.modes = ["generate"]
    else:
        modes = bench.nnterp_vllm_group(settings, path, "m", cuda_graphs=graphs)
    count, new = (int(part) for part in args.scenario.split(":"))
    prompts = bench.make_prompts(AutoTokenizer.from_pretrained(path), count, 100)
    layer = bench._num_layers(path) // 2
    engine = _engine(modes)
    if not args.vanilla:
        modes["m-extract-copier"] = _through_copier(engine, modes["m-extract"])
        modes["m-extract-all-copier"] = _through_copier(engine, modes["m-extract-all"])
    for name in args.modes:
        run = modes[f"m-{name}"]
        run(prompts, new, layer)  # warm
        best = min((_split(engine, lambda: run(prompts, new, layer)) for _ in range(args.repeats)), key=lambda t: t[0])
        print(f"=== {name}: {best[0]:.3f} s: {best[1]} engine steps {best[2]:.3f} s, {best[3]} RPCs {best[4]:.3f} s, "
              f"{best[5]} requests added {best[6]:.3f} s, rest {best[0] - best[2] - best[4] - best[6]:.3f} s"
              + "".join(f"; {part} {calls}x {seconds:.3f} s" for part, (calls, seconds) in best[7].items()), flush=True)
        print(f"=== {name}: parts of the steps (wall, unprofiled)\n" + _step_parts(engine, lambda: run(prompts, new, layer)),
              flush=True)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        run(prompts, new, layer)
        profile.disable()
        wall = time.perf_counter() - start
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats("nnterp", args.top)  # nnterp's own functions, inclusive time
        print(f"=== {name}: {wall:.3f} s (profiled)\n" + "\n".join(text.getvalue().splitlines()[6:]), flush=True)
        if args.segments:
            print(f"=== {name}: replayed segments\n" + _segment_times(lambda: run(prompts, new, layer)), flush=True)
        if args.torch_profiler:
            print(f"=== {name}: CUDA runtime calls\n" + _runtime_calls(lambda: run(prompts, new, layer), args.top), flush=True)


def _through_copier(engine, run):
    """``run`` with the extracted rows copied to host memory and written by the copier's threads (what an engine
    on a GPU that cannot map host memory does) instead of by the GPU: the two compared in one process."""
    def call(*args):
        extractions = engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner.nnterp_extractions
        device_rows, extractions.device_rows = extractions.device_rows, None  # new extractions take the copier
        try:
            return run(*args)
        finally:
            extractions.device_rows = device_rows
    return call


def _runtime_calls(run, top: int) -> str:
    """PyTorch's profiler over ``run``: the operators and CUDA runtime calls with the most own CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        run()
        torch.cuda.synchronize()
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60)


def _segment_times(run) -> str:
    """Host seconds spent in each kind of segment of the breakable graphs replayed during ``run``."""
    from collections import Counter, defaultdict

    from vllm.compilation.breakable_cudagraph import BreakableCUDAGraphWrapper

    tally: dict[str, list] = defaultdict(lambda: [0, 0.0])
    replays: Counter = Counter()
    saved = []

    def kind(segment) -> str:
        if getattr(segment, "__name__", "") == "replay":
            return "graph launch"
        calls = getattr(segment, "calls", [segment])
        return "eager: " + " + ".join(getattr(call, "__qualname__", type(call).__name__).split(".<locals>")[0]
                                      for call in calls)

    def timed(segment, label):
        def call():
            start = time.perf_counter()
            try:
                return segment()
            finally:
                tally[label][0] += 1
                tally[label][1] += time.perf_counter() - start
        return call

    for wrapper in list(BreakableCUDAGraphWrapper._all_instances):
        for descriptor, entry in wrapper.entries.items():
            capture = entry.capture
            if capture is None:
                continue
            saved.append((capture, capture.segments))
            capture.segments = [timed(segment, kind(segment)) for segment in capture.segments]
            original = capture.replay
            capture.replay = (lambda c=capture, d=descriptor, o=original: (replays.update([d]), o())[1])
    try:
        run()
    finally:
        for capture, segments in saved:
            capture.segments = segments
            capture.__dict__.pop("replay", None)
    total = sum(replays.values())
    lines = [f"{total} replays of {len(replays)} batch sizes"]
    for label, (count, seconds) in sorted(tally.items(), key=lambda item: -item[1][1]):
        lines.append(f"{seconds:8.4f} s {count:8d} calls {1e6 * seconds / max(count, 1):7.1f} us/call "
                     f"{count / max(total, 1):6.1f}/replay  {label[:110]}")
    return "\n".join(lines)


def _engine(modes: dict):
    """The LLMEngine behind the modes (their closures hold the StandardizedVLLM, or vanilla vLLM's LLM)."""
    for cell in modes["m-generate"].__closure__:
        model = cell.cell_contents
        if hasattr(model, "vllm_entrypoint"):
            return model.vllm_entrypoint.llm_engine
        if hasattr(model, "llm_engine"):
            return model.llm_engine
    raise RuntimeError("no engine found")


def _step_parts(engine, run) -> str:
    """Wall seconds of the parts of the engine's steps during ``run`` (scheduler, model runner, output processing,
    extraction's per-step work and its copier threads' writes, these on their own threads), timed at their entry
    points (cProfile's counts of these were unreliable: it missed the runner's calls in vanilla vLLM's process
    altogether)."""
    core = engine.engine_core.engine_core
    runner = core.model_executor.driver_worker.worker.model_runner
    parts = {"scheduler.schedule": (core.scheduler, "schedule"),
             "scheduler.update_from_output": (core.scheduler, "update_from_output"),
             "output_processor.process_outputs": (engine.output_processor, "process_outputs"),
             **{f"runner.{name}": (runner, name) for name in (
                 "execute_model", "_update_states", "_prepare_inputs", "_model_forward", "sample_tokens", "_sample",
                 "_bookkeeping_sync")}}
    extractions = runner.__dict__.get("_nnterp_extractions")
    if extractions is not None:  # made at the first extraction
        import nnterp.backends.taps.rows as rows

        parts.update({"extraction.plan_step": (extractions, "plan_step"),
                      "extraction.collect_step": (extractions, "collect_step"),
                      "copier threads: _write_blocks": (rows, "_write_blocks")})
    tally = _timed_calls(parts, run)
    return "\n".join(f"{seconds:8.4f} s {count:6d} calls {1e3 * seconds / max(count, 1):7.3f} ms/call  {name}"
                     for name, (count, seconds) in tally.items())


def _split(engine, run) -> tuple:
    """Wall seconds of ``run``, how many engine steps, worker RPCs and added requests it made and their seconds,
    then ``{name: [calls, seconds]}`` of extraction's client-side parts (planning, taking rows, assembling results)."""
    import nnterp.backends.taps.plan as plan
    import nnterp.backends.vllm.extraction as extraction

    start = time.perf_counter()
    tally = _timed_calls({"step": (engine, "step"), "collective_rpc": (engine, "collective_rpc"),
                          "add_request": (engine, "add_request"), "plan_extraction": (plan, "plan_extraction"),
                          "_take (RPC included)": (extraction, "_take"),
                          "activations": (extraction, "activations")}, run)
    parts = {name: tally[name] for name in ("plan_extraction", "_take (RPC included)", "activations") if tally[name][0]}
    return (time.perf_counter() - start, *tally["step"], *tally["collective_rpc"], *tally["add_request"], parts)


def _timed_calls(parts: dict[str, tuple[object, str]], run) -> dict[str, list]:
    """``[calls, wall seconds]`` of each ``owner.attribute`` in ``parts`` during ``run`` (those the owner lacks stay
    at zero); every attribute is put back as it was, an instance's own (a wrapper the engine installed) included."""
    tally = {name: [0, 0.0] for name in parts}

    def timed(name, original):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                tally[name][0] += 1
                tally[name][1] += time.perf_counter() - start
        return call

    patched = []
    for name, (owner, attribute) in parts.items():
        if hasattr(owner, attribute):
            patched.append((owner, attribute, attribute in vars(owner), getattr(owner, attribute)))
            setattr(owner, attribute, timed(name, getattr(owner, attribute)))
    try:
        run()
    finally:
        for owner, attribute, own, original in patched:
            if own:
                setattr(owner, attribute, original)
            else:
                delattr(owner, attribute)
    return tally


if __name__ == "__main__":
    main()
