"""nnterp.display's plotly and pandas helpers against manual computations; their optional imports."""

import sys

import pytest
import torch

from nnterp.display import plot_topk_tokens, prompts_to_df
from nnterp.prompt_utils import Prompt


def test_missing_optional_dependency_names_the_extra(monkeypatch, llama):
    monkeypatch.setitem(sys.modules, "plotly", None)
    monkeypatch.setitem(sys.modules, "plotly.graph_objects", None)
    with pytest.raises(ImportError, match=r"plot_topk_tokens needs plotly.*nnterp\[display\]"):
        plot_topk_tokens(torch.rand(10), llama.tokenizer)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"prompts_to_df needs pandas.*nnterp\[display\]"):
        prompts_to_df([])


def test_plot_topk_tokens_shows_each_layers_top_tokens(llama, tmp_path):
    probs = torch.rand(4, 3, llama.vocab_size).softmax(-1)
    figure = plot_topk_tokens(probs, llama.tokenizer, k=3, file=tmp_path / "top.html")
    assert len(figure.data) == 4 and figure.layout.width == 3 * 400 and figure.layout.height == 2 * 300
    top = probs[2].topk(3)
    heatmap = figure.data[2]
    assert torch.allclose(torch.tensor(heatmap.z), top.values)
    assert [list(row) for row in heatmap.text] == [[repr(t) for t in llama.tokenizer.convert_ids_to_tokens(ids.tolist())] for ids in top.indices]
    assert "<html>" in (tmp_path / "top.html").read_text() and "Heatmap" in (tmp_path / "top.html").read_text()
    by_id = plot_topk_tokens(probs[0, 0], llama.tokenizer, k=2, use_token_ids=True, title="one")
    assert len(by_id.data) == 1 and by_id.layout.title.text == "one"
    assert [list(row) for row in by_id.data[0].text] == [[str(int(t)) for t in probs[0, 0].topk(2).indices]]
    with pytest.raises(ValueError, match="next_token_probs must be"):
        plot_topk_tokens(torch.rand(1, 2, 3, 4), llama.tokenizer)


def test_prompts_to_df_tabulates_targets(llama):
    prompts = [Prompt("Hello", {"a": [5, 6]}, {"a": "x"}), Prompt("World", {"a": [7]}, {"a": ["y", "z"]})]
    table = prompts_to_df(prompts, llama.tokenizer)
    assert list(table.columns) == [0, 1] and list(table.index) == ["prompt", "a_string", "a_tokens"]
    assert table[1]["prompt"] == "World" and table[1]["a_string"] == ["y", "z"]
    assert table[0]["a_tokens"] == llama.tokenizer.convert_ids_to_tokens([5, 6])
