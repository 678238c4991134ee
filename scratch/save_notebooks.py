"""Execute the teaching notebooks and save them with their outputs (plots included), so they show their results
where they are opened (e.g. on GitHub). Run after editing a notebook:

    HF_HUB_OFFLINE=1 uv run --inexact --extra cpu python scratch/save_notebooks.py [notebooks/NAME.ipynb ...]
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
ENGINE_LOG = re.compile(r"MainProcess pid=|EngineCore|^\[W\d{4}")  # vLLM's log lines, which it prints on stdout


def save_with_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as workdir:
        NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": workdir}}).execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":  # progress bars and engine logs are noise in a saved notebook
            cell.outputs = [output for output in cell.outputs if not (output.output_type == "stream" and output.name == "stderr")]
            for output in cell.outputs:
                if output.output_type == "stream":
                    output.text = "".join(line for line in output.text.splitlines(keepends=True) if not ENGINE_LOG.search(line))
            cell.outputs = [output for output in cell.outputs if output.output_type != "stream" or output.text]
    nbformat.validator.normalize(notebook)
    nbformat.write(notebook, path)
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    paths = [Path(argument).resolve() for argument in sys.argv[1:]] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        save_with_outputs(path)
