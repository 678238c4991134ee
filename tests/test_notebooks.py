"""The teaching notebooks run top to bottom (on SmolLM2-135M and tiny models), and the values they compute match
independent references: a check cell, run after the notebook in its kernel, recomputes them with plain HF forward
passes and hooks on the raw model."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

CHECKS = {
    "01_standardized_access": """
for mt, model in models.items():
    with torch.no_grad(), model.trace('The capital of France is'):
        read = model.layers_output[0].save()
    with torch.no_grad():
        raw = model._module(**model.tokenizer('The capital of France is', return_tensors='pt'), output_hidden_states=True)
    assert torch.allclose(read, raw.hidden_states[1], atol=1e-5), mt
""",
    "02_logit_lens_and_patchscope": """
raw = model._module
with torch.no_grad():
    out = raw(**model.tokenizer(prompt, return_tensors='pt'), output_hidden_states=True)
    assert torch.allclose(lens[-1], out.logits[0, -1].softmax(-1)[tokens], atol=1e-4)
    for layer in (0, 6, 12):
        expected = raw.lm_head(raw.model.norm(out.hidden_states[layer + 1][0, -1])).softmax(-1)[tokens]
        assert torch.allclose(lens[layer], expected, atol=1e-4), layer
""",
    "03_steering_and_patching": """
raw, layers = hf._module, hf._module.model.layers
handles = [layers[i].register_forward_hook(lambda m, a, out: (out[0] + 4.0 * direction, *out[1:]) if isinstance(out, tuple) else out + 4.0 * direction)
           for i in range(10, 20)]
try:
    with torch.no_grad():
        expected = raw(**hf.tokenizer(prompt, return_tensors='pt')).logits[0, -1].softmax(-1)
finally:
    for handle in handles:
        handle.remove()
for name in ('hf', 'vllm'):
    assert torch.allclose(results[name][0], expected, atol=1e-4), name
""",
    "04_run_with_cache_and_decomposition": """
raw = model._module
for row, text in enumerate(prompts):
    with torch.no_grad():
        last = raw(**model.tokenizer(text, return_tensors='pt')).logits[0, -1]
    assert abs(float(logit_diff[row]) - float(last[paris] - last[rome])) < 1e-3, row
    assert abs(float(attributions[:, row].sum()) - float(last[paris] - last[rome])) < 1e-3, row
head_dim = model.hidden_size // model.num_heads
def zero_head(module, args):
    value = args[0].clone()
    value[..., head * head_dim:(head + 1) * head_dim] = 0
    return (value, *args[1:])
handle = raw.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(zero_head)
try:
    with torch.no_grad():
        last = raw(**model.tokenizer(prompts[0], return_tensors='pt')).logits[0, -1]
finally:
    handle.remove()
assert abs(float(ablated_diff) - float(last[paris] - last[rome])) < 1e-3
""",
    "05_served_engine": """
raw = hf._module
with torch.no_grad():
    hidden = raw(**hf.tokenizer(prompt, return_tensors='pt'), output_hidden_states=True).hidden_states[6][0]
assert float((captured - hidden).abs().max() / hidden.abs().max()) < 1e-5  # float32 engine vs HF
assert steered.text == hf_steered.text and plain.text != steered.text
if server.poll() is None:
    server.kill()
""",
}


def test_there_are_teaching_notebooks():
    assert len(NOTEBOOKS) >= 4 and set(CHECKS) == {path.stem for path in NOTEBOOKS}


def test_notebooks_use_the_public_api_and_show_their_plots():
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        code = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
        assert "._module" not in code and "_torch_module" not in code, path.stem
        for cell in notebook.cells:  # saved with outputs, so plots show where the notebook is opened
            if cell.cell_type == "code" and ("print(" in cell.source or "figure" in cell.source):
                assert cell.get("outputs"), (path.stem, cell.source[:60])
            if cell.cell_type == "code" and "figure = plot" in cell.source:
                assert cell.source.rstrip().endswith("figure"), (path.stem, "a figure is built but not shown")
                assert any("image/png" in output.get("data", {}) for output in cell.outputs), path.stem


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_matches_references(path, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(CHECKS[path.stem]))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
              if output.get("output_type") == "error"]
    assert not errors, [(error["ename"], error["evalue"]) for error in errors]
