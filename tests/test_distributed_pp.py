"""Pipeline stages on 2 gloo CPU processes: each holds part of the layers (the others are vLLM's
PPMissingLayer stubs) and runs the same trace body; reads of the other stage's layers are lazy placeholders."""

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.backends.distributed.pp import merge_stage_saves  # noqa: E402
from harness.distributed import PP_PROMPT, bind, pp_out_of_order, pp_trace, run_on_ranks  # noqa: E402

SPLIT = 2  # stage 0 holds layers 0-1, stage 1 layer 2


@pytest.fixture(scope="module")
def reference(tiny_path):
    from nnterp import StandardizedTransformer

    path = tiny_path("llama")
    model = StandardizedTransformer(str(path), check_layout=False)
    with torch.no_grad(), model.trace(PP_PROMPT):
        unsteered = model.layers_output[0].save()
    with torch.no_grad():
        hidden = model._module(**model.tokenizer(PP_PROMPT, return_tensors="pt"), output_hidden_states=True).hidden_states
    assert model.num_layers == 3 and torch.allclose(unsteered, hidden[1], atol=1e-6)  # agrees with plain HF
    with torch.no_grad(), model.trace(PP_PROMPT):  # the body pp_trace runs on each stage, in one process
        model.layers_output[0] = model.layers_output[0] * 2
        first, last, logits = model.layers_output[0].save(), model.layers_output[-1].save(), model.logits.save()
    return {"first": first, "last": last, "logits": logits, "path": str(path)}


@pytest.fixture(scope="module")
def stages(reference):
    return run_on_ranks(bind(pp_trace, path=reference["path"], split=SPLIT), world_size=2, timeout=300)


def test_each_layer_has_exactly_one_owning_stage(stages):
    assert stages[0]["owners"] == stages[1]["owners"] == {"layers.0": 0, "layers.1": 0, "layers.2": 1}


def test_reads_of_other_stages_are_placeholders_returned_without_blocking(stages):
    assert stages[0]["remote"] == {"first": False, "last": True}
    assert stages[1]["remote"] == {"first": True, "last": False}
    assert stages[0]["returned_at_once"] and stages[1]["returned_at_once"]


def test_pipeline_reproduces_the_single_process_model(stages, reference):
    merged = merge_stage_saves([stage["saves"] for stage in stages])
    assert torch.allclose(merged["first"], reference["first"], atol=1e-6)
    assert torch.allclose(merged["last"], reference["last"], atol=1e-5)
    assert torch.allclose(stages[1]["logits"], reference["logits"], atol=1e-5)  # the last stage's logits


def test_out_of_order_consumption_raises_the_single_process_error(reference):
    """Stage 0 reads the last layer before writing layer 0: it gets the error a single process gets;
    stage 1 (whose write is a no-op) then needs a layer 0 nobody published and times out, never hangs."""
    from nnterp import StandardizedTransformer

    model = StandardizedTransformer(reference["path"], check_layout=False)
    with pytest.raises(Exception) as single:
        with torch.no_grad(), model.trace(PP_PROMPT):
            late = model.layers_output[-1]
            model.layers_output[0] = model.layers_output[0] + 0 * late.sum()
            model.layers_output[0].sum().item()
    results = run_on_ranks(bind(pp_out_of_order, path=reference["path"], split=SPLIT, timeout=3.0), world_size=2, timeout=300)
    assert results[0]["error"] == f"{type(single.value).__name__}: {single.value}", results[0]
    assert results[1]["error"].startswith("CrossStageTimeout") and "forward order" in results[1]["error"], results[1]
    assert all(result["seconds"] < 30 for result in results)


def _local_channel():
    from torch.distributed import HashStore

    from nnterp.backends.distributed.pp import StageChannel
    from nnterp.backends.distributed.transport import StageTransport

    return StageChannel(StageTransport(HashStore(), timeout=1))


def test_operations_on_a_placeholder_wait_until_its_contents_are_needed():
    from nnterp.backends.distributed.pp import RemoteValue

    channel, value, fetches = _local_channel(), torch.arange(6.0).reshape(2, 3), []
    channel.publish("layer", value)

    def fetch():
        fetches.append(1)
        return channel.fetch("layer", "layer")

    placeholder = RemoteValue(fetch, "layer")
    result = (placeholder.float() * 2 + 1)[:, 1].softmax(-1)
    assert isinstance(result, RemoteValue) and not fetches  # recorded, nothing fetched
    assert torch.equal(result.materialize(), (value * 2 + 1)[:, 1].softmax(-1)) and fetches == [1]
    assert placeholder.shape == (2, 3) and fetches == [1]  # fetched once


def test_saves_resolve_from_published_values_and_drop_what_nobody_published():
    from nnterp.backends.distributed.pp import RemoteValue, resolve_saves

    channel = _local_channel()
    channel.publish("published", torch.ones(2))

    def placeholder(key):
        return RemoteValue(None, key, lookup=lambda: channel.fetch_if_published(key))

    saves = {"doubled": placeholder("published") * 2, "missing": [placeholder("never")], "local": torch.zeros(1)}
    resolved = resolve_saves(saves, RemoteValue.lookup)
    assert set(resolved) == {"doubled", "local"} and torch.equal(resolved["doubled"], torch.full((2,), 2.0))


def test_a_published_value_is_the_value_at_publication():
    channel, value = _local_channel(), torch.ones(3)
    channel.publish("layer", value)
    value.mul_(5)  # the holder reuses its buffer afterwards, as vLLM does
    assert torch.equal(channel.fetch("layer", "layer"), torch.ones(3))


def test_a_value_released_before_it_is_read_is_the_cross_stage_error_naming_it():
    """Read in the foreground or pulled in the background, a value its holder no longer holds (still
    announced) is an immediate error naming the read."""
    from nnterp.backends.distributed.pp import CrossStageTimeout

    channel = _local_channel()
    channel.publish("read", torch.ones(2))
    channel.publish("pulled", torch.ones(2))
    with channel.transport._lock:
        channel.transport._held.clear()
    with pytest.raises(CrossStageTimeout, match=r"layer 3: .*no longer holds \['read'\]"):
        channel.fetch("read", "layer 3")
    channel.prefetch("pulled")
    with pytest.raises(CrossStageTimeout, match=r"layer 4: .*no longer holds \['pulled'\]"):
        channel.fetch("pulled", "layer 4")


@pytest.fixture(scope="module")
def transfers():
    from harness.distributed import TRANSFER_TIMEOUT_S, transport_transfers

    return run_on_ranks(bind(transport_transfers, last_rank_delay=TRANSFER_TIMEOUT_S + 2), world_size=3, timeout=300)


def test_values_travel_between_processes_point_to_point(transfers):
    """Rank 0 holds; ranks 1 and 2 pull a 24 MiB value (larger than a key-value store takes in one piece), a
    bfloat16 value and three values in one request; the store only ever held their descriptions. Rank 2
    reached its transport two seconds past the transport's timeout: joining the ranks waits longer than
    a value does."""
    reference = transfers[0]["values"]
    for consumer in transfers[1:]:
        assert consumer["values"].keys() == reference.keys()
        for key, value in reference.items():
            assert consumer["values"][key].dtype == value.dtype and torch.equal(consumer["values"][key], value), key
        assert consumer["largest_store_entry"] < 100  # bytes: a description, never a tensor
        for key, value in consumer["prefetched"].items():  # pulled in the background, several per request
            assert torch.equal(value, reference[key]), key


def test_released_values_are_freed_and_unannounced(transfers):
    holder = transfers[0]
    assert holder["held_bytes_before"] > 24 << 20 and holder["held_bytes_after"] == 0 and holder["held_keys_after"] == []
    assert all(consumer["announced_after_release"] is False for consumer in transfers[1:])


def test_a_value_nobody_publishes_times_out_with_its_key(transfers):
    consumer = transfers[1]
    assert consumer["missing"].startswith("TransportTimeout") and "never-published" in consumer["missing"]
    assert consumer["missing_seconds"] < 10


def test_a_value_its_holder_dropped_fails_at_once(transfers):
    """The holder answers every pull: a value it no longer holds is an immediate error, not a receive that
    times out (which would also close the connection for every later pull)."""
    for consumer in transfers[1:]:
        assert consumer["dropped"].startswith("TransportTimeout") and "no longer holds" in consumer["dropped"]
        assert consumer["dropped_seconds"] < 2


def test_a_value_that_never_arrives_fails_within_the_timeout(transfers):
    """Announced, but its holder never sends it: the receive gives up after the transport's timeout."""
    from harness.distributed import TRANSFER_TIMEOUT_S

    consumer = transfers[1]
    assert consumer["stuck"].startswith("TransportTimeout") and "stuck (held by rank 0) did not arrive" in consumer["stuck"]
    assert TRANSFER_TIMEOUT_S - 0.5 < consumer["stuck_seconds"] < TRANSFER_TIMEOUT_S + 5


def test_the_reported_stage_error_is_the_first_that_is_not_a_timeout():
    from nnterp.backends.vllm.worker import first_cause

    timeout, shape = {"type_name": "CrossStageTimeout"}, {"type_name": "ValueError"}
    assert first_cause([timeout, None, shape]) is shape  # stage 1's real error explains stage 0's wait
    assert first_cause([timeout, None]) is timeout and first_cause([None, None]) is None
