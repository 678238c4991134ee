"""``python -m nnterp.demo``: its output against plain HuggingFace forwards of SmolLM2-135M-Instruct."""

import importlib.util
import re
import subprocess
import sys

import torch

from nnterp import demo

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def test_importing_the_demo_loads_no_heavy_module():
    """The first progress line comes before torch, transformers and nnsight load (seconds on 2 cores)."""
    code = "import sys, nnterp.demo, nnterp.__main__; print(sorted({'torch', 'transformers', 'nnsight', 'vllm'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_demo_output(tmp_path, capsys, monkeypatch, smollm2):
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")  # what the demo sets, scoped to this test
    monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "ERROR")
    demo.main(["--out", str(tmp_path)])
    output = capsys.readouterr().out
    assert output.splitlines()[0].endswith("loading torch, transformers and nnsight...")

    hf = smollm2._module
    input_ids = smollm2.tokenizer(demo.PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = hf(input_ids).logits[0, -1].softmax(-1)
    paris = int(probs.argmax())
    assert smollm2.tokenizer.decode([paris]) == " Paris"

    rows = re.findall(r"^\s+(\d+)  ('.*?')\s+([\d.]+)\s+([\d.e+-]+)\s+(\d+)$", output, re.M)
    assert [int(row[0]) for row in rows] == list(range(smollm2.num_layers))  # every layer, in order
    last = rows[-1]
    assert last[1] == "' Paris'" and last[4] == "1" and abs(float(last[2]) - probs[paris].item()) < 1e-3
    assert all(row[1] != "' Paris'" for row in rows[:-1])
    assert f"' Paris' is the top token from layer {smollm2.num_layers - 1}" in output

    heatmap = tmp_path / "logit_lens.png"
    assert f"heatmap written to {heatmap.resolve()}" in output
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^  steered: ' London'", output, re.M)

    if HAS_VLLM:
        assert re.search(r"^  next token\s+' Paris' [\d.]+\s+' Paris' [\d.]+$", output, re.M)
        assert re.search(r"^  steered next token\s+' London' [\d.]+\s+' London' [\d.]+$", output, re.M)
        assert f"same top token at {smollm2.num_layers} of {smollm2.num_layers} layers" in output
    else:
        assert "vLLM is not installed" in output
