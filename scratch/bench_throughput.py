"""Throughput of activation extraction: vanilla vLLM (eager and CUDA graphs), nnsight's vLLM trace, StandardizedVLLM
eager and on CUDA graphs (trace, extract one layer, extract all layers, steering at every step), plain HF forward
with a hook, StandardizedTransformer (trace, extract).

    uv run --inexact --extra cpu python scratch/bench_throughput.py                      # CPU: tiny random Llama, ratios
    uv run --inexact --extra cpu python scratch/bench_throughput.py --quick              # the CI command (fewer prompts)
    python3 scratch/bench_throughput.py --model random-1b --scenarios 256:0 4096:0 256:32 --out r.jsonl   # GPU

Each group of modes runs in a fresh process (one engine at a time), its modes taking turns ``--repeats`` times;
each measurement (the best of its runs) prints one JSON line (mode, prompts, tokens, seconds, tokens_per_s, cpu_seconds,
device, host_ms) as soon as it exists, and a table of
ratios closes the run: vLLM modes against vanilla vLLM with the same engine settings (eager, same batch and
scheduler limits, chunked prefill off, in-process engine core), HF modes against the plain forward with a hook.
``x graphs`` is the ratio to vanilla vLLM with CUDA graphs (vLLM's default, measured in the same run; GPU only),
``x brk`` to vanilla vLLM on breakable graphs (``vllm-breakable``, the kind nnterp's graph engines record), ``x v1``
to vanilla vLLM with its default graphs on its V1 model runner (``vllm-graphs-v1``: the runner nnsight's and
nnterp's workers extend, where vLLM's default on a GPU is its V2 runner).
``tokens`` counts prompt tokens plus generated tokens. ``nnterp-vllm-*`` is StandardizedVLLM's eager engine,
``nnterp-graphs-*`` the same on CUDA graphs serving every accessor (``cuda_graphs=True``), ``nnterp-lean-*`` serving
only ``layers_output`` (``cuda_graphs=("layers_output",)``); ``*-generate`` runs the engine with nothing extracted
(what the worker costs by itself, the ``x engine`` base); ``*-steer`` adds a vector to one layer at every step
through a served request's ``nnterp`` object. Every mode saves the residual stream after the middle
layer (``--layer``) of every prompt to host memory ("all" modes: every layer), each result dropped as it comes
(``*-extract-all-kept``, run only when named: every result held until the run ends, as ``list(model.extract(...))``
does). On a shared CPU machine compare ``cpu_seconds`` (the process's CPU time) rather than wall time. On a GPU,
the engine arguments in ``NNTERP_VLLM_ARGS`` (JSON) apply to every vLLM mode, e.g. the attention backend.
``host`` is how much slower the record's process ran a fixed piece of pure Python (``host_ms``) than the
baseline's: a decode step of 256 prompts is bound by the host, and the host's speed varied 1.7x between processes
on one machine, so read a ratio next to it; ``--rounds N`` runs every group N times in fresh processes taking turns
and keeps each mode's best.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # every vLLM mode runs its engine core in-process

GROUPS = {  # modes that share one process (one model or engine)
    "vllm": ["vllm"],
    "vllm-graphs": ["vllm-graphs"],
    "vllm-breakable": ["vllm-breakable"],
    "vllm-graphs-v1": ["vllm-graphs-v1"],
    "nnsight": ["nnsight-trace"],
    "nnterp-vllm": ["nnterp-vllm-generate", "nnterp-vllm-trace", "nnterp-vllm-extract", "nnterp-vllm-extract-all",
                    "nnterp-vllm-extract-all-kept", "nnterp-vllm-steer"],
    "nnterp-graphs": ["nnterp-graphs-generate", "nnterp-graphs-trace", "nnterp-graphs-extract",
                      "nnterp-graphs-extract-all", "nnterp-graphs-extract-all-kept", "nnterp-graphs-steer"],
    "nnterp-lean": ["nnterp-lean-generate", "nnterp-lean-trace", "nnterp-lean-extract", "nnterp-lean-extract-all",
                    "nnterp-lean-extract-all-kept", "nnterp-lean-steer"],
    "hf": ["hf-hooks", "hf-hooks-all", "hf-nnterp-trace", "hf-nnterp-extract", "hf-nnterp-extract-all"],
}
TRACE_MODES = {"nnsight-trace", "nnterp-vllm-trace", "nnterp-graphs-trace", "nnterp-lean-trace", "hf-nnterp-trace"}
GRAPH_GROUPS = {"vllm-graphs", "vllm-breakable", "vllm-graphs-v1", "nnterp-graphs", "nnterp-lean"}  # need a GPU
ENGINE_PREFIXES = ("nnterp-vllm", "nnterp-graphs", "nnterp-lean")  # StandardizedVLLM modes: "<prefix>-generate" is the engine  # measured in the first scenario only
BASELINE = {"vllm": "vllm", "hf": "hf-hooks", "hf-nnterp-extract-all": "hf-hooks-all"}  # extract-all: hooks on every layer
WORDS = ("The capital of France is Paris . Germany Berlin Italy Rome Eiffel Tower Hello world this is a tiny model "
         "used to test interpretability tools A cat sat on the mat ; the dog ran in park One two three four five "
         "six Le chat est noir Der Hund ist braun El perro es grande").split()


# -- models and prompts ---------------------------------------------------------------------------------------

def model_path(name: str, cache: Path) -> str:
    """A directory for ``tiny`` (random Llama, width 128, 3 layers), ``random-1b`` (random Llama, width 2048,
    16 layers, 1.07B parameters, bf16) or ``smollm2``; anything else is taken as a path."""
    from nnterp.testing.tiny import build_tiny_model, tiny_config

    target = cache / name
    if (target / "config.json").exists():
        return str(target)
    if name == "tiny":
        return str(build_tiny_model("llama", target, max_position_embeddings=1024).path)
    if name == "random-1b":
        import torch
        from transformers import AutoModelForCausalLM

        from nnterp.testing.tokenizer import save_tokenizer

        config = tiny_config("llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                             num_attention_heads=32, num_key_value_heads=32, head_dim=64, max_position_embeddings=4096)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(str(target))
        save_tokenizer(target)
        return str(target)
    if name == "smollm2":
        from nnterp.testing.smollm2 import smollm2_path

        return str(smollm2_path())
    return name


def make_prompts(tokenizer, count: int, tokens: int, seed: int = 0) -> list[str]:
    """``count`` texts of about ``tokens`` tokens each (random words)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < tokens:
            words.extend(rng.choice(WORDS) for _ in range(8))
        ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][: tokens - 1]
        prompts.append(tokenizer.decode(ids))
    return prompts


# -- modes ------------------------------------------------------------------------------------------------------

def vllm_settings(args) -> dict:
    settings = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_batched_tokens, "enable_chunked_prefill": False,
                "enable_prefix_caching": False, "dtype": args.dtype}
    settings.update(json.loads(os.environ.get("NNTERP_VLLM_ARGS", "{}")))
    import torch

    if not torch.cuda.is_available():
        settings.setdefault("kv_cache_memory_bytes", 2**30)
    return settings


def sampling(max_new_tokens: int) -> dict:
    return {"max_tokens": max(1, max_new_tokens), "temperature": 0.0, "ignore_eos": True}


def vllm_group(args, path: str, graphs: bool, breakable: bool = False, runner_v1: bool = False) -> dict[str, Callable]:
    """Vanilla vLLM: eager, its default CUDA graphs, or breakable graphs in its default graph mode (what nnterp's
    graph engines record, without their breaks); ``runner_v1``: on vLLM's V1 model runner."""
    settings = vllm_settings(args)
    if breakable:
        os.environ["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"  # this group's own process
    if runner_v1:
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    from vllm import LLM, SamplingParams

    llm = LLM(path, enforce_eager=not graphs, **settings)

    def run(prompts, max_new_tokens, layer):
        llm.generate(prompts, SamplingParams(**sampling(max_new_tokens)), use_tqdm=False)

    name = "vllm-breakable" if breakable else "vllm-graphs-v1" if runner_v1 else "vllm-graphs"
    return {name if graphs else "vllm": run}


def nnsight_group(args, path: str) -> dict[str, Callable]:
    from nnsight.modeling.vllm import VLLM

    from nnterp.backends.vllm.engine import cpu_meta_build, no_accelerator, worker_class

    if no_accelerator():  # nnsight ships no CPU worker: use the one nnterp adds
        VLLM._WORKER_CLS = worker_class()
    with cpu_meta_build():
        model = VLLM(path, dispatch=True, **vllm_settings(args))

    def run(prompts, max_new_tokens, layer):
        with model.trace(**sampling(max_new_tokens)) as tracer:
            for prompt in prompts:
                with tracer.invoke(prompt):
                    hidden, residual = model.model.layers[layer].output
                    (hidden + residual).cpu().save()

    return {"nnsight-trace": run}


def nnterp_vllm_group(args, path: str, prefix: str = "nnterp-vllm", cuda_graphs=False) -> dict[str, Callable]:
    """StandardizedVLLM's modes; ``cuda_graphs`` as StandardizedVLLM takes it."""
    from nnterp.backends.taps.spec import RequestSpec, Steer
    from nnterp.standardized.vllm import StandardizedVLLM

    from vllm import SamplingParams

    model = StandardizedVLLM(path, cuda_graphs=cuda_graphs, **vllm_settings(args))
    if cuda_graphs:
        print("INFO seams " + json.dumps(model.vllm_entrypoint.collective_rpc("nnterp_seams")), flush=True)

    def generate(prompts, max_new_tokens, layer):  # the same engine, nothing extracted: its own overhead
        model.vllm_entrypoint.generate(prompts, SamplingParams(**sampling(max_new_tokens)), use_tqdm=False)

    def trace(prompts, max_new_tokens, layer):
        with model.trace(**sampling(max_new_tokens)) as tracer:
            for prompt in prompts:
                with tracer.invoke(prompt):
                    model.layers_output[layer].cpu().save()

    def extract(layers, kept: bool = False):
        def run(prompts, max_new_tokens, layer):
            results = model.extract(prompts, layers=layer if layers is None else layers, max_new_tokens=max_new_tokens,
                                    progress=False, ignore_eos=True)
            if kept:
                results = list(results)  # every result held until the end (then dropped), as list(...) does
            consume(results)
        return run

    def steer(prompts, max_new_tokens, layer):  # a served request's steering (the server's nnterp object) at every step
        vector = [1e-3] * model.hidden_size
        spec = RequestSpec(steer=[Steer([layer], vector, 1.0, "all")]).to_json()
        params = SamplingParams(**sampling(max_new_tokens), extra_args={"nnterp": spec})
        model.vllm_entrypoint.generate(prompts, params, use_tqdm=False)

    modes = {"generate": generate, "trace": trace, "extract": extract(None), "extract-all": extract(range(model.num_layers)),
             "extract-all-kept": extract(range(model.num_layers), kept=True), "steer": steer}
    return {f"{prefix}-{name}": run for name, run in modes.items()}


def hf_group(args, path: str) -> dict[str, Callable]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nnterp import StandardizedTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    raw = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = StandardizedTransformer(raw, tokenizer=tokenizer)
    batch = args.hf_batch_size

    def hooks_at(chosen: Callable[[int], list[int]]):
        """A plain forward per batch with forward hooks on the chosen layers, each output copied to the host."""
        def run(prompts, max_new_tokens, layer):
            saved = []
            handles = [raw.model.layers[index].register_forward_hook(lambda module, inputs, output: saved.append(
                output[0] if isinstance(output, tuple) else output)) for index in chosen(layer)]
            try:
                for start in range(0, len(prompts), batch):
                    inputs = tokenizer(prompts[start:start + batch], return_tensors="pt", padding=True).to(device)
                    with torch.inference_mode():
                        raw(**inputs, use_cache=False)
                    for value in saved:
                        value.cpu()
                    saved.clear()
            finally:
                for handle in handles:
                    handle.remove()
        return run

    def trace(prompts, max_new_tokens, layer):
        for start in range(0, len(prompts), batch):
            with torch.inference_mode(), model.trace(prompts[start:start + batch]):
                model.layers_output[layer].cpu().save()

    def extract(all_layers):
        def run(prompts, max_new_tokens, layer):
            layers = range(model.num_layers) if all_layers else layer
            consume(model.extract(prompts, layers=layers, batch_size=batch, progress=False))
        return run

    return {"hf-hooks": hooks_at(lambda layer: [layer]), "hf-hooks-all": hooks_at(lambda layer: range(model.num_layers)),
            "hf-nnterp-trace": trace, "hf-nnterp-extract": extract(False),
            "hf-nnterp-extract-all": extract(True)}


def consume(results: Iterable) -> None:
    for _ in results:
        pass


# -- one group in this process -------------------------------------------------------------------------------

def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores)"


def run_group(args) -> None:
    bare_ms = host_speed()  # before any engine exists: the machine's speed for this process
    import torch
    from transformers import AutoTokenizer

    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # as vLLM's CPU worker does; two threads on a shared 2-core machine stall on each other

    path = model_path(args.model, Path(args.cache))
    tokenizer = AutoTokenizer.from_pretrained(path)
    builders = {"vllm": lambda: vllm_group(args, path, graphs=False), "vllm-graphs": lambda: vllm_group(args, path, True),
                "vllm-breakable": lambda: vllm_group(args, path, True, breakable=True),
                "vllm-graphs-v1": lambda: vllm_group(args, path, True, runner_v1=True),
                "nnsight": lambda: nnsight_group(args, path), "nnterp-vllm": lambda: nnterp_vllm_group(args, path),
                "nnterp-graphs": lambda: nnterp_vllm_group(args, path, "nnterp-graphs", cuda_graphs=True),
                "nnterp-lean": lambda: nnterp_vllm_group(args, path, "nnterp-lean", cuda_graphs=("layers_output",)),
                "hf": lambda: hf_group(args, path)}
    modes = builders[args.group]()
    modes = {mode: run for mode, run in modes.items() if mode in args.modes}
    layer = args.layer if args.layer is not None else _num_layers(path) // 2
    scenarios = [tuple(int(part) for part in scenario.split(":")) for scenario in args.scenarios]
    prompts = make_prompts(tokenizer, max(count for count, _ in scenarios), args.prompt_tokens)
    prompt_tokens = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    for run in modes.values():
        run(prompts[:4], 0, layer)  # warm-up
    host_ms = host_speed()
    print(f"INFO host: {bare_ms} ms bare, {host_ms} ms with the engine; threads: {busy_threads()}", flush=True)
    for position, (count, max_new_tokens) in enumerate(scenarios):
        wanted = {mode: run for mode, run in modes.items()
                  if not (mode in TRACE_MODES and position > 0) and not (mode.startswith("hf") and max_new_tokens > 0)}
        times = {mode: [] for mode in wanted}  # traces are measured once; HF modes measure the forward pass only
        for _ in range(args.repeats):  # modes take turns, so a drift of the machine reaches them all alike
            for mode, run in wanted.items():
                times[mode].append(timed(lambda: run(prompts[:count], max_new_tokens, layer)))
        for mode, measured in times.items():
            wall, cpu = min(wall for wall, _ in measured), min(cpu for _, cpu in measured)
            tokens = sum(prompt_tokens[:count]) + count * max_new_tokens
            record = {"mode": mode, "model": args.model, "prompts": count, "max_new_tokens": max_new_tokens,
                      "tokens": tokens, "seconds": round(wall, 4), "tokens_per_s": round(tokens / wall, 1),
                      "cpu_seconds": round(cpu, 4), "layer": layer, "device": device_name(), "host_ms": host_ms,
                      "host_bare_ms": bare_ms}
            print("RESULT " + json.dumps(record), flush=True)


def host_speed() -> float:
    """Milliseconds this process takes for a fixed piece of pure Python (dict and list work, as a scheduler does):
    the host's speed for this process, which decides a host-bound decode step (it varied 1.7x between processes
    on one machine)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buckets: dict[int, list[int]] = {}
        for index in range(100_000):
            buckets.setdefault(index % 997, []).append(index)
        best = min(best, time.perf_counter() - start)
    return round(best * 1e3, 2)


def busy_threads() -> str:
    """The other threads of this process and where each is (one that runs Python while the engine steps takes the
    interpreter from it)."""
    import threading

    frames = sys._current_frames()
    where = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident)
        if thread is not threading.current_thread() and frame is not None:
            where.append(f"{thread.name}@{Path(frame.f_code.co_filename).name}:{frame.f_lineno}:{frame.f_code.co_name}")
    return ", ".join(where)


def timed(run: Callable[[], None]) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def _num_layers(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).num_hidden_layers


# -- driver ------------------------------------------------------------------------------------------------------

def drive(args, argv: list[str]) -> int:
    records, failed = [], []
    groups = [group for group, modes in GROUPS.items() if set(modes) & set(args.modes)]
    # Each round runs every group in a fresh process, in turn (every other round in reverse order), and a mode keeps
    # its best measurement: a process whose host ran slower weighs on one round only.
    order = [group for round_ in range(args.rounds) for group in (groups if round_ % 2 == 0 else groups[::-1])]
    for group in order:
        command = [sys.executable, __file__, *argv, "--group", group]
        started = time.time()
        process = subprocess.run(command, capture_output=True, text=True, timeout=args.group_timeout)
        lines = [line[len("RESULT "):] for line in process.stdout.splitlines() if line.startswith("RESULT ")]
        for line in process.stdout.splitlines():
            if line.startswith("INFO "):
                print(f"# {group}: {line[len('INFO '):]}", flush=True)
        for line in lines:
            record = json.loads(line)
            records.append(record)
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as handle:
                    handle.write(line + "\n")
        if process.returncode != 0:
            failed.append(group)
            print(f"# group {group} failed after {time.time() - started:.0f} s:\n{process.stderr[-3000:]}",
                  file=sys.stderr, flush=True)
    print(table(best_records(records)))
    return 1 if failed else 0


def best_records(records: list[dict]) -> list[dict]:
    """The fastest measurement of each mode and scenario (over rounds), in the order they first came."""
    best: dict[tuple, dict] = {}
    for record in records:
        key = (record["mode"], record["prompts"], record["max_new_tokens"])
        if key not in best or record["seconds"] < best[key]["seconds"]:
            best[key] = record
    return list(best.values())


def host_ratio(record: dict, base: Optional[dict]) -> float:
    """How much slower this record's process ran the fixed Python of :func:`host_speed` than the baseline's."""
    if not base or not record.get("host_ms") or not base.get("host_ms"):
        return float("nan")
    return record["host_ms"] / base["host_ms"]


def table(records: list[dict]) -> str:
    """Throughput per mode and its ratio to the baseline: vanilla vLLM (another process) and, for
    StandardizedVLLM's modes, the same engine with nothing extracted; the plain forward with a hook for HF."""
    def baseline(record, mode):
        return next((other for other in records if other["mode"] == mode and other["prompts"] == record["prompts"]
                     and other["max_new_tokens"] == record["max_new_tokens"]), None)

    def ratio(base, record, key):
        return base[key] / record[key] if base else float("nan")

    lines = ["", f"{'mode':26} {'prompts':>7} {'new':>4} {'tokens':>8} {'tok/s':>10} {'x base':>7} {'x graphs':>8} "
                 f"{'x brk':>6} {'x v1':>6} {'x engine':>8} {'cpu s':>7} {'x base cpu':>10} {'host':>5}"]
    for record in records:
        hf = record["mode"].startswith("hf")
        base = baseline(record, BASELINE.get(record["mode"], BASELINE["hf" if hf else "vllm"]))
        graphs = None if hf else baseline(record, "vllm-graphs")
        breakable = None if hf else baseline(record, "vllm-breakable")
        runner_v1 = None if hf else baseline(record, "vllm-graphs-v1")
        prefix = next((prefix for prefix in ENGINE_PREFIXES if record["mode"].startswith(prefix + "-")), None)
        engine = baseline(record, f"{prefix}-generate") if prefix else None
        lines.append(f"{record['mode']:26} {record['prompts']:>7} {record['max_new_tokens']:>4} {record['tokens']:>8} "
                     f"{record['tokens_per_s']:>10.0f} {ratio(base, record, 'seconds'):>7.2f} "
                     f"{ratio(graphs, record, 'seconds'):>8.2f} {ratio(breakable, record, 'seconds'):>6.2f} "
                     f"{ratio(runner_v1, record, 'seconds'):>6.2f} "
                     f"{ratio(engine, record, 'seconds'):>8.2f} "
                     f"{record['cpu_seconds']:>7.2f} {ratio(base, record, 'cpu_seconds'):>10.2f} "
                     f"{host_ratio(record, graphs or base):>5.2f}")
    if records:
        lines.append(f"device: {records[0]['device']}; model: {records[0]['model']}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--scenarios", nargs="+", default=["256:0", "256:32"],
                        help="PROMPTS:NEW_TOKENS pairs (0 new tokens: one forward pass per prompt)")
    parser.add_argument("--prompt-tokens", type=int, default=101)
    parser.add_argument("--layer", type=int, default=None, help="the layer saved (default: the middle one)")
    parser.add_argument("--modes", nargs="+",
                        default=[mode for modes in GROUPS.values() for mode in modes if not mode.endswith("-kept")])
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (the best is kept)")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-batched-tokens", type=int, default=8192)
    parser.add_argument("--cache", default=os.environ.get("NNTERP_BENCH_CACHE", "/tmp/nnterp-bench"))
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    parser.add_argument("--group-timeout", type=int, default=1800)
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per group, taking turns (best kept)")
    parser.add_argument("--quick", action="store_true", help="the CI run: 128 prompts, 8 generated tokens")
    parser.add_argument("--group", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args()
    import torch

    if args.dtype is None:
        args.dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    if not torch.cuda.is_available():  # no CUDA graphs on CPU
        args.modes = [mode for mode in args.modes if not any(mode in GROUPS[group] for group in GRAPH_GROUPS)]
    if args.quick:
        args.scenarios = ["128:0", "128:8"]
    if args.group is not None:
        run_group(args)
        return 0
    return drive(args, argv)


if __name__ == "__main__":
    sys.exit(main())
