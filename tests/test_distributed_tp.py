"""Tensor-parallel parameter gather on vLLM's own parallel layers, sharded over 2 gloo CPU ranks."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from torch.distributed.tensor import Replicate, Shard  # noqa: E402

from harness.distributed import TP_SIZES, full_weights, run_on_ranks, tp_shard_and_gather  # noqa: E402


@pytest.fixture(scope="module")
def ranks():
    return run_on_ranks(tp_shard_and_gather, world_size=2, vllm=True)


def test_placements_follow_the_layer_class(ranks):
    assert ranks[0]["placements"] == {"qkv": Shard(0), "gate_up": Shard(0), "down": Shard(1), "column": Shard(0),
                                      "head": Shard(0), "replicated": Replicate(), "down.bias": Replicate()}


def test_parameters_really_are_sharded(ranks):
    shapes = ranks[0]["local_shapes"]
    assert shapes["down"] == (TP_SIZES["hidden"], TP_SIZES["ffn"] // 2) and shapes["gate_up"] == (TP_SIZES["ffn"], TP_SIZES["hidden"])
    assert shapes["head"][0] * 2 > TP_SIZES["vocab"]  # each rank holds half of a padded vocabulary


def test_gather_rebuilds_the_full_logical_tensors_on_every_rank(ranks):
    w = full_weights()
    expected = {
        "qkv": torch.cat([w["q"], w["k"], w["v"]]),  # the single KV head is replicated on both ranks: kept once
        "gate_up": torch.cat([w["gate"], w["up"]]),
        "down": w["down"], "down.bias": w["down_bias"],
        "column": w["column"], "column.bias": w["column_bias"],
        "head": w["head"],  # vocabulary padding stripped
        "replicated": w["replicated"],
    }
    for rank in ranks:
        for name, tensor in expected.items():
            assert rank["gathered"][name].shape == tensor.shape, name
            assert torch.equal(rank["gathered"][name], tensor), name
