"""Prepare a vLLM wheelhouse for the GPU device machines and print the install sequence.

    python scratch/device_wheelhouse.py prepare [--python 3.12]   # downloads into wheelhouse/, splits into parts
    python scratch/device_wheelhouse.py plan                     # the device calls, one part per call

The device image has torch 2.11.0 and transformers but no vLLM, no nnsight and no network, and a call
carries at most 64 MiB of ignored files. vllm 0.25.1 (the release pinned to torch 2.11.0) is one 239 MiB
wheel, so the wheelhouse is split into 60 MiB parts carried one per call under ``wheelhouse/``; each call
appends its part to ``/tmp/nnterp-wheelhouse`` on the device, and the last one joins the parts and installs
with ``pip install --no-index --no-deps``. Parts only survive while the machine stays warm (its idle
release is short), so the calls must follow each other without pause.

vllm is installed without its dependency closure: it pins packages this project's registry does not
carry (``llguidance>=1.7,<1.8``) and pulls GPU kernels nnterp does not need for eager traces
(flashinfer-cubin, tilelang). RUNTIME lists what ``import vllm`` and an eager ``LLM(...)`` need beyond
the image; extend it when the device reports a missing module.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

WHEELHOUSE = Path(__file__).resolve().parents[1] / "wheelhouse"  # ignored by git; carried by the device calls
PART_BYTES = 60 * 2**20
PINNED = ["vllm==0.25.1", "nnsight==0.8.1"]
RUNTIME = [
    "blake3", "cachetools", "cbor2", "cloudpickle", "compressed-tensors==0.17.0", "depyf==0.20.0", "diskcache==5.6.3",
    "einops", "gguf", "ijson", "lark==1.2.2", "msgspec", "ninja", "openai-harmony", "partial-json-parser",
    "prometheus_client", "py-cpuinfo", "pybase64", "python-json-logger", "pyzmq", "setproctitle", "watchfiles",
    "mistral_common", "outlines_core==0.2.14", "xgrammar", "astor", "greenlet",
]


def prepare(python: str) -> None:
    WHEELHOUSE.mkdir(exist_ok=True)
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", python,
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(WHEELHOUSE / "wheels")]
    subprocess.run(download + PINNED + RUNTIME, check=True)
    archive = WHEELHOUSE / "wheels.tar"
    subprocess.run(["tar", "-cf", str(archive), "-C", str(WHEELHOUSE), "wheels"], check=True)
    data = archive.read_bytes()
    for index in range(0, len(data), PART_BYTES):
        (WHEELHOUSE / f"part-{index // PART_BYTES:02d}").write_bytes(data[index:index + PART_BYTES])
    archive.unlink()
    print(f"{len(data) / 2**20:.0f} MiB in {(len(data) + PART_BYTES - 1) // PART_BYTES} parts under {WHEELHOUSE}")


def plan() -> None:
    parts = sorted(WHEELHOUSE.glob("part-*"))
    for position, part in enumerate(parts):
        command = f"mkdir -p /tmp/nnterp-wheelhouse && cp wheelhouse/{part.name} /tmp/nnterp-wheelhouse/"
        if position == len(parts) - 1:
            command += (" && cd /tmp/nnterp-wheelhouse && cat part-* | tar -x && pip install --no-index --no-deps wheels/*.whl"
                        " && python -c 'import vllm, nnsight; print(vllm.__version__, nnsight.__version__)'")
        print(f"run(carry=['wheelhouse/{part.name}'], command={command!r})")
    print("then: run(command='VLLM_ENABLE_V1_MULTIPROCESSING=0 python scratch/gpu_equivalence.py')")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("prepare", "plan"))
    parser.add_argument("--python", default="3.12")
    args = parser.parse_args()
    prepare(args.python) if args.action == "prepare" else plan()
