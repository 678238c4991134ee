"""Served throughput: ``nnterp serve`` against vLLM's own server started the same way (same model, same engine
settings: eager, no prefix caching), in one run.

    uv run --inexact --extra cpu python scratch/bench_serve.py [--model PATH|tiny|random-1b] [--requests 64]
                                                                [--max-tokens 32] [--out results.jsonl]

Each server runs in its own process group on a free loopback port. For each workload, ``--requests`` completions
(prompts of 100 tokens, fewer when the model's context is short; greedy, ``ignore_eos``) are sent at once from as many threads; the table reports
generated tokens per second and the ratio to vLLM's server with plain requests, eager like nnterp's (and, on a GPU,
to vLLM's server with its default CUDA graphs, ``vllm graphs``):

- ``plain``: no interventions (nnterp's server against vLLM's);
- ``capture 1 layer``: the middle layer's ``layers_output`` over the prompt tokens, returned with the response;
- ``steer every step``: a vector added to the middle layer's output at every token.

``nnterp graphs`` is ``nnterp serve --no-enforce-eager`` (GPU): breakable CUDA graphs with every accessor served.
``--kinds`` picks the servers (the first one run is the baseline when ``vllm`` is left out).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harness.server import free_port, wait_until_serving  # noqa: E402

PLAIN_SERVER = """
import sys
from nnterp.backends.vllm.server import run_vllm_serve
if __name__ == "__main__":
    run_vllm_serve(sys.argv[1:])
"""

def model_path(name: str, workdir: Path) -> str:
    if name not in ("tiny", "random-1b"):
        return name
    from nnterp.testing.tiny import build_tiny_model

    if name == "tiny":
        return str(build_tiny_model("llama", workdir / "tiny").path)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nnterp.testing.tokenizer import save_tokenizer

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
    target = workdir / "random-1b"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(target)
    save_tokenizer(target)
    return str(target)


def start(kind: str, path: str, engine: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if kind.startswith("nnterp"):  # "nnterp graphs": breakable CUDA graphs, every accessor served at replay
        graphs = ["--no-enforce-eager"] if kind == "nnterp graphs" else []
        command = [sys.executable, "-m", "nnterp", "serve", path, "--port", str(port), *graphs, *engine]
    else:
        from nnterp.backends.vllm.engine import no_accelerator

        extra = ["--kv-cache-memory-bytes", str(1 << 30)] if no_accelerator() else []
        eager = ["--enforce-eager"] if kind == "vllm" else []  # "vllm graphs": vLLM's default CUDA graphs
        command = [sys.executable, "-c", PLAIN_SERVER, "serve", path, "--port", str(port), "--host", "127.0.0.1",
                   *eager, "--no-enable-prefix-caching", *extra, *engine]
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_{kind.replace(' ', '_')}.log", "w")
    print(f"starting {kind} server (log: {log.name})", flush=True)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, 900, None)
    return process, url


def stop(process: subprocess.Popen) -> None:
    import signal

    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def make_prompts(path: str, count: int, tokens: int) -> list[str]:
    """``count`` different prompts of exactly ``tokens`` tokens each."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    words = "the capital of france is paris and the river seine runs through it while tourists walk".split()
    prompts = []
    for index in range(count):
        text = " ".join(words[(index + i) % len(words)] for i in range(tokens))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        prompts.append(tokenizer.decode(ids))
    return prompts


def run_workload(url: str, model: str, nnterp: dict | None, prompts: list[str], max_tokens: int) -> float:
    import urllib.error
    import urllib.request

    def send(index: int) -> int:
        prompt = prompts[index]
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        if nnterp:
            body["nnterp"] = nnterp
        request = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=900) as reply:
                return json.loads(reply.read())["usage"]["completion_tokens"]
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{url} answered {error.code}: {error.read().decode()[:500]}") from None

    send(0)  # warm up
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        tokens = sum(pool.map(send, range(len(prompts))))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--engine", default="", help="extra engine arguments for both servers, e.g. '--dtype bfloat16'")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--kinds", nargs="+", default=None,
                        help="servers to run (default: vllm, nnterp; on a GPU also 'vllm graphs', 'nnterp graphs')")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = model_path(args.model, Path(workdir))
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        middle, width = config.num_hidden_layers // 2, config.hidden_size
        workloads = {
            "plain": None,
            "capture 1 layer": {"capture": [{"accessor": "layers_output", "layers": [middle], "tokens": "prompt"}]},
            "steer every step": {"steer": [{"layers": [middle], "vector": [0.01] * width, "tokens": "all"}]},
        }
        length = min(512, getattr(config, "max_position_embeddings", 512))
        engine = args.engine.split() + ["--max-model-len", str(length)]
        prompts = make_prompts(path, args.requests, min(100, length - args.max_tokens - 8))
        rates: dict[tuple[str, str], float] = {}
        from nnterp.backends.vllm.engine import no_accelerator

        kinds = args.kinds or (("vllm", "nnterp") if no_accelerator() else ("vllm graphs", "nnterp graphs", "vllm", "nnterp"))
        for kind in kinds:
            process, url = start(kind, path, engine)
            try:
                for name, spec in workloads.items():
                    if not kind.startswith("nnterp") and spec is not None:
                        continue
                    rates[kind, name] = max(run_workload(url, path, spec, prompts, args.max_tokens)
                                            for _ in range(args.repeats))
                    print(f"{kind} / {name}: {rates[kind, name]:.0f} tokens/s", flush=True)
            finally:
                stop(process)
    baseline = rates.get(("vllm", "plain")) or rates[next(iter(rates))[0], "plain"]
    graphs = rates.get(("vllm graphs", "plain"))
    print(f"{'server':12} {'workload':18} {'tokens/s':>10} {'vs vLLM':>8} {'vs graphs':>10}")
    for (kind, name), rate in rates.items():
        versus_graphs = f"{rate / graphs:10.2f}" if graphs else f"{'-':>10}"
        print(f"{kind:12} {name:18} {rate:10.0f} {rate / baseline:8.2f} {versus_graphs}")
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps({"server": kind, "workload": name, "tokens_per_s": rate, "ratio": rate / baseline,
                                         "model": args.model, "requests": args.requests, "max_tokens": args.max_tokens}) + "\n")


if __name__ == "__main__":
    main()
