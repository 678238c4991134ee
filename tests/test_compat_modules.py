"""nnterp.utils, nnterp.rename_utils and nnterp.logging against the model configs and modules they describe."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from nnterp import utils
from nnterp.core.rename import RenameConfig
from nnterp.rename_utils import (
    IOType,
    get_hidden_size,
    get_num_attention_heads,
    get_rename_dict,
    get_vocab_size,
    text_config,
)


def test_logger_is_nnterps():
    from nnterp.logging import logger

    assert logger is logging.getLogger("nnterp") and logger.handlers


def test_small_utils(llama):
    assert utils.unpack_tuple((1, 2)) == 1 and utils.unpack_tuple(3) == 3
    assert utils.DummyCache().to_legacy_cache() is None and not utils.is_notebook()
    with torch.no_grad():
        logits = llama._module(**utils.dummy_inputs()).logits
    assert logits.shape == (1, 3, llama.vocab_size)
    import nnsight
    import transformers

    assert (utils.NNSIGHT_VERSION, utils.TRANSFORMERS_VERSION) == (nnsight.__version__, transformers.__version__)


def test_try_with_scan_reports_scan_or_trace_and_raises_the_given_error(llama):
    seen = []
    assert utils.try_with_scan(llama, lambda: seen.append(llama.layers_output[0].shape), RuntimeError("x"), allow_dispatch=True)
    assert seen and tuple(seen[0]) == (1, 3, llama.hidden_size)

    def broken():
        raise KeyError("boom")

    with pytest.raises(RuntimeError, match="given") as caught:
        utils.try_with_scan(llama, broken, RuntimeError("given"), allow_dispatch=True, warn_if_scan_fails=False)
    assert isinstance(caught.value.__cause__, KeyError)
    with pytest.raises(KeyError):
        utils.try_with_scan(llama, broken, RuntimeError("given"), allow_dispatch=True, errors_to_raise=KeyError)


def test_config_sizes_honour_keys_and_numbers(llama, gpt2):
    assert get_num_attention_heads(llama) == llama._module.config.num_attention_heads
    assert get_hidden_size(gpt2) == gpt2._module.config.n_embd and get_vocab_size(gpt2) == gpt2._module.config.vocab_size
    assert text_config(llama) is llama._module.config
    config = type("Config", (), {"width": 7, "heads": 2})()
    model = type("Model", (), {"config": config})()
    assert get_hidden_size(model, raise_error=False) is None
    with pytest.raises(ValueError, match="hidden_size_config_key"):
        get_hidden_size(model)
    keys = type("Keys", (), {"hidden_size_config_key": ["width"], "attn_head_config_key": 3, "vocab_size_config_key": None})()
    assert get_hidden_size(model, rename_config=keys) == 7 and get_num_attention_heads(model, rename_config=keys) == 3


def test_rename_dict_maps_every_alias_to_its_standard_name(llama):
    rename = get_rename_dict(RenameConfig(layers="backbone.blocks", self_attn="mixer"))
    assert rename["backbone.blocks"] == "layers" and rename["mixer"] == "self_attn"
    assert rename["transformer.h"] == "layers" and rename["attn"] == "self_attn" and rename["model.norm"] == "ln_final"
    assert rename["transformer"] == "model" and rename["lm_head"] == "lm_head"
    names = llama.names
    for standard in ("embed_tokens", "layers", "ln_final", "lm_head"):
        assert get_rename_dict()[getattr(names, standard)] == standard
    assert IOType("input") is IOType.INPUT and IOType.OUTPUT.value == "output"


def test_standardized_transformer_module_path_is_nnterp_1x():
    import nnterp
    from nnterp.standardized_transformer import StandardizedTransformer

    assert StandardizedTransformer is nnterp.StandardizedTransformer


def test_layer_accessor_built_with_nnterp_1x_arguments_reads_the_raw_modules(llama):
    """``LayerAccessor(model, None | "mlp", IOType...)`` and ``accessor(layer=i)`` read what forward hooks on the
    raw modules see in a plain forward."""
    from nnterp.core.accessors import LayerAccessor

    layer_outputs = LayerAccessor(llama, None, IOType.OUTPUT)
    mlp_inputs = LayerAccessor(llama, "mlp", IOType.INPUT)
    raw_layer = llama._torch_module("layers")[1]
    assert layer_outputs.get_module(layer=1)._module is raw_layer
    assert llama.mlps.get_module(layer=1)._module is raw_layer.mlp and llama.mlps(layer=1)._module is raw_layer.mlp
    seen = {}

    def keep(name, pick):
        def hook(module, args, output):
            seen[name] = pick(args, output)  # returns None: the forward is left unchanged
        return hook

    handles = [raw_layer.register_forward_hook(keep("layer", lambda args, out: out[0] if isinstance(out, tuple) else out)),
               raw_layer.mlp.register_forward_hook(keep("mlp_in", lambda args, out: args[0]))]
    ids = llama.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    try:
        with torch.no_grad():
            llama._module(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad(), llama.trace(ids):
        mlp_in = mlp_inputs[1].save()
        layer_out = layer_outputs(layer=1).save()
    assert torch.allclose(layer_out, seen["layer"], atol=1e-5) and torch.allclose(mlp_in, seen["mlp_in"], atol=1e-5)
    with pytest.raises(ValueError, match="model.attentions"):
        LayerAccessor(llama, "self_attn", None)
    with pytest.raises(ValueError, match=r"model.layers\[i\].input_layernorm.output"):
        LayerAccessor(llama, "input_layernorm", IOType.OUTPUT)


def test_get_ignores_names_the_modules_a_model_lacks(tiny_path):
    """nnterp 1.x's get_ignores: "mlp" where the layers have no MLP child (OPT runs fc1/fc2 inline), the
    RenameConfig's own ignores, nothing for a model that has both blocks."""
    from nnterp.rename_utils import RenameConfig, get_ignores

    opt = AutoModelForCausalLM.from_pretrained(str(tiny_path("opt")))
    llama = AutoModelForCausalLM.from_pretrained(str(tiny_path("llama")))
    opt_children = set(dict(opt.model.decoder.layers[0].named_children()))
    assert "mlp" not in opt_children and {"fc1", "fc2", "self_attn"} <= opt_children
    assert get_ignores(opt) == ["mlp"]
    assert get_ignores(llama) == []
    assert get_ignores(llama, RenameConfig(ignore_attn=True)) == ["attention"]


def test_module_accessor_nn_model_traces_the_same_modules(tiny_path):
    """ModuleAccessor.nn_model is the model under nnsight with the standard names: its layer output in a trace
    equals a hook on the raw module, and non-module attributes are refused as nnterp 1.x refused them."""
    from nnterp.nnsight_utils import ModuleAccessor

    model = AutoModelForCausalLM.from_pretrained(str(tiny_path("gpt2"))).eval()
    accessor = ModuleAccessor(model)
    assert accessor.nn_model.layers[1]._module is model.transformer.h[1] is accessor.get_layers()[1]
    ids = torch.tensor([[5, 6, 7, 8]])
    seen = []
    handle = model.transformer.h[1].register_forward_hook(
        lambda module, args, output: seen.append((output[0] if isinstance(output, tuple) else output).clone()))
    with torch.no_grad():
        model(ids)
    handle.remove()
    with torch.no_grad(), accessor.nn_model.trace(ids):
        output = accessor.nn_model.layers[1].output.save()
    assert torch.equal(output[0] if isinstance(output, tuple) else output, seen[0])
    with pytest.raises(AttributeError, match="Attribute config is not a module"):
        accessor.config
