"""The first minutes of a new user: a fresh clone runs the README's demo command; how big is its environment,
and when does the first result come?

    python scratch/measure_demo_install.py [--cold-uv-cache] [--keep-smollm2]

Clones this repository's HEAD into a temporary directory, runs the README's demo command there (fresh
``.venv``; a fresh ``NNTERP_CACHE`` so the SmolLM2 conversion is counted unless ``--keep-smollm2``; a fresh uv
cache with ``--cold-uv-cache``, so every package is downloaded), prints each output line with the seconds since
the start, then the times of the first demo line and the first result, the CPU seconds spent, the size of
``.venv`` and the load average (other processes on the machine slow the wall-clock times).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MILESTONES = {"first demo line": "nnterp demo on", "first result": "next token after", "done": "] done."}


def demo_command() -> str:
    """The README's demo command (the first of its two setup lines)."""
    commands = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("pip install uv &&")]
    return next(command for command in commands if "nnterp.demo" in command)


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file() and not file.is_symlink())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-uv-cache", action="store_true", help="download every package into a fresh uv cache")
    parser.add_argument("--keep-smollm2", action="store_true", help="reuse the converted SmolLM2 in NNTERP_CACHE")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nnterp-first-hour-"))
    clone = work / "nnterp"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if not args.keep_smollm2:
        env["NNTERP_CACHE"] = str(work / "nnterp-cache")
    if args.cold_uv_cache:
        env["UV_CACHE_DIR"] = str(work / "uv-cache")
    command = demo_command()
    print(f"$ {command}   (in {clone}; load average {os.getloadavg()})", flush=True)
    start = time.monotonic()
    seen: dict[str, float] = {}
    process = subprocess.Popen(command, shell=True, cwd=clone, env=env, text=True, bufsize=1,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in process.stdout:
        elapsed = time.monotonic() - start
        if not re.match(r"^\S.*it/s\]$", line.strip()):  # progress-bar redraws
            print(f"{elapsed:7.1f} | {line}", end="", flush=True)
        for name, marker in MILESTONES.items():
            if marker in line:
                seen.setdefault(name, elapsed)
    process.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"\nexit status {process.returncode}, {time.monotonic() - start:.1f} s in all")
    for name, seconds in seen.items():
        print(f"{name}: {seconds:.1f} s")
    print(f"CPU: {usage.ru_utime:.1f} s user + {usage.ru_stime:.1f} s system")
    print(f".venv: {directory_size(clone / '.venv') / 2**30:.2f} GiB; load average now {os.getloadavg()}")
    sys.exit(process.returncode)


if __name__ == "__main__":
    main()
