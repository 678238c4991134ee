"""model.extract on HF models: against HF's own hidden states and raw-module hooks of each prompt run alone
(padding, absolute positions, in-place parent updates), against the trace path, and its errors."""

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nnterp import StandardizedTransformer
from nnterp.extraction import ACCESSORS, save_activations
from nnterp.backends.taps.device_rows import DeviceRows
from nnterp.backends.taps.rows import PromptRows, RowCopier
from nnterp.backends.taps.transfer import HostTransfer, InFlight

PROMPTS = ["The capital of France is", "Hello", "One two three four five six. The cat sat on the mat.", "A"]


def hidden_states_alone(model, prompt: str) -> tuple[torch.Tensor, ...]:
    """HF's ``hidden_states`` of the prompt run alone: entry i is the stream entering layer i."""
    ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model._module(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # GPT-2's absolute positions break under left padding
def test_layers_input_equals_hf_hidden_states_of_each_prompt_alone(tiny_path, model_type):
    model = StandardizedTransformer(str(tiny_path(model_type)))
    results = list(model.extract(PROMPTS, accessors="layers_input", batch_size=3, progress=False))
    assert [result.index for result in results] == list(range(len(PROMPTS)))
    for result, prompt in zip(results, PROMPTS):
        reference = torch.stack(hidden_states_alone(model, prompt)[:model.num_layers])[:, 0]
        assert result["layers_input"].shape == reference.shape  # [layers, tokens, hidden]: no padding rows
        assert torch.allclose(result["layers_input"], reference, atol=1e-5), prompt
        assert result.token_ids == model.tokenizer(prompt)["input_ids"]


def test_every_accessor_equals_the_trace_of_each_prompt_alone(llama):
    results = list(llama.extract(PROMPTS, accessors=ACCESSORS, layers=[0, 2], batch_size=2, progress=False))
    for result, prompt in zip(results, PROMPTS):
        for name in ACCESSORS:
            with torch.no_grad(), llama.trace(prompt):
                first = getattr(llama, name)[0].save()
                last = getattr(llama, name)[2].save()
            traced = torch.stack([first[0], last[0]])
            assert torch.allclose(result[name], traced, atol=1e-5), (name, prompt)


def test_a_copy_is_taken_when_read_not_after_the_parent_adds_into_it(tiny_path):
    """Falcon's layer adds the attention output into the tensor its MLP returned, in place."""
    model = StandardizedTransformer(str(tiny_path("falcon")))
    layer = model._module.transformer.h[1]
    seen = {}
    handles = [layer.mlp.register_forward_hook(lambda module, args, output: seen.update(mlp=output.clone())),
               layer.self_attention.register_forward_hook(lambda module, args, output: seen.update(attn=output[0].clone()))]
    try:
        with torch.no_grad():
            model._module(input_ids=model.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"])
    finally:
        for handle in handles:
            handle.remove()
    result = next(model.extract(PROMPTS[:1], accessors="mlps_output", layers=1, progress=False))
    assert torch.allclose(result["mlps_output"][0], seen["mlp"][0], atol=1e-6)
    assert not torch.allclose(result["mlps_output"][0], seen["mlp"][0] + seen["attn"][0], atol=1e-3)


def test_the_forward_pass_stops_after_the_last_tap(llama):
    calls = []
    handle = llama._module.lm_head.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = next(llama.extract(PROMPTS[:1], layers=0, progress=False))
    finally:
        handle.remove()
    assert calls == []
    assert torch.allclose(result["layers_output"][0], hidden_states_alone(llama, PROMPTS[0])[1][0], atol=1e-5)


def test_generation_adds_the_rows_of_generated_tokens(llama):
    results = list(llama.extract(PROMPTS[:2], layers=[1], max_new_tokens=3, progress=False))
    for result, prompt in zip(results, PROMPTS):
        prompt_ids = llama.tokenizer(prompt)["input_ids"]
        assert 1 <= len(result.generated) <= 3
        assert result.token_ids == prompt_ids + result.generated[:-1]
        with torch.no_grad():
            continued = llama._module.generate(torch.tensor([prompt_ids]), **llama.greedy_generation_kwargs(3))
            hidden = llama._module(input_ids=torch.tensor([result.token_ids]), output_hidden_states=True).hidden_states
        assert continued[0, len(prompt_ids):].tolist()[:len(result.generated)] == result.generated
        assert torch.allclose(result["layers_output"][0], hidden[2][0], atol=1e-5)


def test_token_id_prompts_and_text_prompts_agree(llama):
    ids = llama.tokenizer(PROMPTS[0])["input_ids"]
    from_text, from_ids = llama.extract([PROMPTS[0], ids], layers=1, progress=False)
    assert from_ids.token_ids == ids
    assert torch.allclose(from_text["layers_output"], from_ids["layers_output"], atol=1e-6)


def test_abandoned_extraction_removes_its_hooks(llama):
    def hooks():
        return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in llama._module.modules()]

    before = hooks()
    results = llama.extract(PROMPTS, accessors=("layers_input", "layers_output"), layers=[0, 1], batch_size=1,
                            progress=False)
    next(results)
    assert hooks() != before
    results.close()
    assert hooks() == before


@pytest.mark.parametrize("kwargs, error, match", [
    ({"accessors": "layer_output"}, ValueError, r"layer_output.* is not one of them"),
    ({"accessors": ("layers_output", "layers_output")}, ValueError, "names one accessor twice"),
    ({"layers": [0, 0]}, ValueError, "names one layer twice"),
    ({"layers": 7}, IndexError, r"out of range: the model has 3 layers"),
    ({"batch_size": 0}, ValueError, "batch_size must be at least 1"),
])
def test_bad_arguments_are_refused_before_anything_runs(llama, kwargs, error, match):
    with pytest.raises(error, match=match):
        llama.extract(PROMPTS, progress=False, **kwargs)


def test_a_prompt_of_no_tokens_is_refused_by_its_index(llama):
    with pytest.raises(ValueError, match="prompt 2 has no tokens: give it some text or token ids"):
        list(llama.extract(["Hello", "A", []], batch_size=1, progress=False))


def test_a_single_string_is_refused(llama):
    with pytest.raises(TypeError, match="list of prompts"):
        llama.extract("The capital of France is")


@pytest.mark.parametrize("accessors", [("layers_output", "mlps_input"), ("layers_output",)])
def test_shards_hold_every_prompt(llama, tmp_path, accessors):
    """Prompts' activations are views of shared host blocks: each is stored as its own rows."""
    results = list(llama.extract(PROMPTS, accessors=accessors, layers=[0, 2], progress=False))
    paths = save_activations(iter(results), tmp_path, prompts_per_shard=3)
    assert [path.name for path in paths] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    stored = {**load_file(str(paths[0])), **load_file(str(paths[1]))}
    for result in results:
        for name in accessors:
            assert torch.equal(stored[f"{result.index}/{name}"], result[name])
        assert stored[f"{result.index}/token_ids"].tolist() == result.token_ids


def test_prompt_rows_replace_recomputed_tokens_and_refuse_gaps():
    """An engine that preempts a request recomputes it from an earlier position; a prefix cache skips tokens."""
    transfer, copier = HostTransfer(), RowCopier(threads=2)
    first, second = torch.arange(24.0).reshape(1, 6, 4), -torch.arange(20.0).reshape(1, 5, 4)
    for expected in (12, 8):  # more rows expected than run (a tensor of its own), or exactly as many (a view)
        rows = PromptRows(expected)
        copier.copy(transfer.start(first.clone()), [rows.add(0, 4, 0, "prompt 0")])
        copier.copy(transfer.start(first.clone()), [rows.add(4, 2, 4, "prompt 0")])
        copier.copy(transfer.start(second.clone()), [rows.add(0, 5, 3, "prompt 0")])  # recomputed from token 3
        result = copier.finish(rows).result(timeout=30)
        assert torch.equal(result, torch.cat([first[:, :3], second], dim=1))
        with pytest.raises(RuntimeError, match="tokens 8..9 were never run"):
            rows.add(0, 1, 10, "prompt 0")
    copier.close()


@pytest.mark.parametrize("kind", ["copier", "device"])
def test_row_writers_keep_each_prompts_order_and_trim_to_the_rows_run(kind):
    """Many prompts (over several copier threads), one row each per step (a decode): each prompt's tensor holds its
    own rows in token order; a prompt that stopped early is cut to its rows (a tensor of its own, contiguous);
    rows past the expected count (a step an engine ran ahead) are dropped."""
    write, copier = row_writer(kind, threads=3)
    prompts = [PromptRows(expected=6) for _ in range(7)]
    stops = [6, 6, 3, 6, 1, 6, 6]  # rows each prompt runs
    steps = [torch.randn(2, len(prompts), 5) for _ in range(7)]  # 7 steps: one more than expected
    for step, values in enumerate(steps):
        items = [prompt.add(row, 1, step, f"prompt {row}") for row, prompt in enumerate(prompts) if step < stops[row] or stops[row] == 6]
        write(values, items)
    for row, prompt in enumerate(prompts):
        result = copier.finish(prompt).result(timeout=30)
        expected = torch.stack([steps[step][:, row] for step in range(min(stops[row], 6))], dim=1)
        assert result.is_contiguous() and torch.equal(result, expected)
    copier.close()


def test_row_copier_reports_a_failed_copy_where_the_rows_are_asked_for():
    copier = RowCopier(threads=1)

    class Broken(InFlight):
        def __init__(self, fails_in: str):
            super().__init__(torch.zeros(1, 2, 3))
            self.fails_in = fails_in

        def done(self):
            return False

        def wait(self):
            if self.fails_in == "wait":
                raise OSError("the transfer failed")

        def host(self):
            if self.fails_in == "host":
                raise OSError("the host block is gone")
            return super().host()

    for fails_in, message in (("wait", "the transfer failed"), ("host", "the host block is gone")):
        prompt = PromptRows(expected=2)
        copier.copy(Broken(fails_in), [prompt.add(0, 2, 0, "prompt 0")])
        with pytest.raises(OSError, match=message):
            copier.finish(prompt).result(timeout=30)
    unwritten = PromptRows(expected=2)
    unwritten.add(0, 2, 0, "prompt 1")  # rows announced, never handed to the copier
    with pytest.raises(RuntimeError, match="0 of 2 rows were copied: the capture lost track of this prompt"):
        copier.finish(unwritten).result(timeout=30)
    copier.close()


def row_writer(kind: str, threads: int):
    """``(write(values, items), writer)``: the copier threads after a transfer to host memory, or the device's own
    writes (``DeviceRows``, here the CPU's)."""
    if kind == "copier":
        transfer, copier = HostTransfer(), RowCopier(threads=threads)
        return (lambda values, items: copier.copy(transfer.start(values), items)), copier
    writer = DeviceRows(torch.device("cpu"))
    return writer.copy, writer


@pytest.mark.parametrize("kind", ["copier", "device"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_row_writers_match_a_row_by_row_reference_over_shuffled_mixed_steps(monkeypatch, seed, kind):
    """Steps as an engine runs them: prompts arrive over time, prefill chunks (several rows) and decode rows (one)
    in one buffer, in a batch order that changes from step to step, blocks of a few prompts each (so a step
    spans blocks and lanes), a prompt recomputed from an earlier position, prompts that stop early. Each prompt's
    tensor equals its rows written one at a time into a tensor of its own."""
    import random

    import nnterp.backends.taps.rows as rows_module

    monkeypatch.setattr(rows_module, "BLOCK_PROMPTS", 3)
    rng = random.Random(seed)
    write, copier = row_writer(kind, threads=3)
    taps, width = 2, 5
    lengths = [rng.randint(2, 9) for _ in range(11)]  # rows each prompt runs
    expected = [length + rng.choice([0, 0, 3]) for length in lengths]  # some stop before their expected count
    prompts = [PromptRows(count) for count in expected]
    reference = [torch.zeros(taps, count, width) for count in expected]
    done = [0] * len(prompts)
    recomputed = False
    for step in range(40):
        running = [index for index in range(min(len(prompts), 2 + 2 * step)) if done[index] < lengths[index]]
        if not running:
            break
        rng.shuffle(running)
        plan = []
        for index in running:
            position = done[index]
            if not recomputed and position > 3 and rng.random() < 0.3:
                position, recomputed = 1, True  # preempted and recomputed from token 1
            count = 1 if position else min(lengths[index], rng.randint(1, 4))  # a prefill chunk, then decode
            plan.append((index, position, min(count, lengths[index] - position)))
        values = torch.randn(taps, sum(count for *_, count in plan), width)
        items, offset = [], 0
        for index, position, count in plan:
            items.append(prompts[index].add(offset, count, position, f"prompt {index}"))
            reference[index][:, position:position + count] = values[:, offset:offset + count]
            done[index] = position + count
            offset += count
        write(values, items)
    assert done == lengths and recomputed
    for index, prompt in enumerate(prompts):
        result = copier.finish(prompt).result(timeout=30)
        assert result.is_contiguous() and torch.equal(result, reference[index][:, :lengths[index]]), index
    copier.close()


def test_registered_memory_stays_registered_while_referred_to_or_kept_and_is_let_go_after(monkeypatch):
    """Host memory a GPU writes is registered with CUDA once, while a block or a user's tensor refers to it or it
    is kept for reuse; free memory past the limit is unregistered, the oldest first, as it comes back (whichever
    thread drops the last tensor); closing unregisters the free memory, and memory still referred to as it comes
    back; memory freed without closing is unregistered as it is freed."""
    import gc

    import nnterp.backends.taps.device_rows as device_rows

    registered: list[int] = []
    monkeypatch.setattr(device_rows, "register", lambda array: registered.append(array.ctypes.data))
    monkeypatch.setattr(device_rows, "unregister", lambda address: registered.remove(address))
    memory = device_rows.MappedMemory(keep=8192, working_set=0)
    views = [memory.take(4096) for _ in range(4)]  # 16 KiB referred to: all stay registered past the limit
    addresses = [view.ctypes.data for view in views]
    assert sorted(registered) == sorted(addresses)
    tensor = torch.from_numpy(views[3][1024:2048]).view(torch.float32)  # a user's tensor
    for _ in range(3):
        thread = threading.Thread(target=views.pop, args=(0,))  # dropped on another thread
        thread.start()
        thread.join()
    assert sorted(registered) == sorted(addresses[1:])  # 8 KiB free kept, the oldest let go
    again = memory.take(4096)
    assert again.ctypes.data == addresses[1] and sorted(registered) == sorted(addresses[1:])  # reused as it is
    memory.clear()
    assert sorted(registered) == sorted([addresses[1], addresses[3]])  # still referred to
    del views, again
    gc.collect()
    assert registered == [addresses[3]] and tensor.shape == (256,)
    del tensor
    gc.collect()
    assert not registered
    dropped = device_rows.MappedMemory()  # an engine dropped without closing
    view = dropped.take(4096)
    assert registered == [view.ctypes.data]
    del dropped, view
    gc.collect()
    assert not registered  # unregistered as its memory was freed


def test_host_memory_that_cannot_be_mapped_onto_the_device_raises_the_error_the_worker_falls_back_on():
    from nnterp.backends.taps.device_rows import RegistrationError, device_view

    with pytest.raises(RegistrationError, match="host memory could not be mapped onto cuda:0: "):
        device_view(np.zeros((2, 8), dtype=np.uint8), torch.device("cuda:0"))  # memory never registered


def test_device_rows_report_a_failed_write_where_the_rows_are_asked_for():
    writer = DeviceRows(torch.device("cpu"))
    prompt, other = PromptRows(expected=1), PromptRows(expected=1)
    writer.copy(torch.randn(1, 1, 4), [prompt.add(5, 1, 0, "prompt 0")])  # row 5 of a buffer of one row
    with pytest.raises(IndexError, match="out of range"):
        writer.finish(prompt).result(timeout=30)
    values = torch.randn(1, 1, 4)
    writer.copy(values, [other.add(0, 1, 0, "prompt 1")])  # the writer goes on
    assert torch.equal(writer.finish(other).result(timeout=30), values)


def test_compact_copies_a_view_of_a_shared_block_only():
    """What leaves the engine's process is pickled with its whole storage: a prompt's view must not carry its
    block."""
    import pickle

    from nnterp.backends.taps.rows import compact

    block = torch.randn(1000, 8)
    view = block[10:20]
    assert len(pickle.dumps(compact(view))) < len(pickle.dumps(view)) / 10
    assert torch.equal(compact(view), view)
    alone = torch.randn(10, 8)
    assert compact(alone) is alone


def test_block_memory_is_reused_only_once_no_tensor_refers_to_it():
    from nnterp.backends.taps.host_memory import BlockMemory
    from nnterp.backends.taps.rows import RowBlock

    memory = BlockMemory(keep=1 << 20)
    block = RowBlock(memory.take(4096), 4, 1024, lane=0)
    view = block.tensor[1:3].view(torch.float32)  # a prompt's tensor
    address = block.bytes.ctypes.data
    del block
    other = memory.take(4096)
    assert other.ctypes.data != address  # a prompt's tensor still refers to it
    del view
    assert memory.take(4096).ctypes.data == address  # nothing does: taken again
    assert memory.take(8192).ctypes.data != address  # too small
    small = BlockMemory(keep=8192)
    arrays = [small.take(4096) for _ in range(3)]
    kept = [array.ctypes.data for array in arrays[1:]]
    while arrays:
        del arrays[0]  # given back in order
    again = [small.take(4096) for _ in range(2)]
    assert sorted(array.ctypes.data for array in again) == sorted(kept)  # the first given back was let go


def test_free_memory_kept_follows_what_was_in_use_at_once_up_to_the_working_set_limit(monkeypatch):
    """An extraction that needs a little more than the memory kept takes no fresh memory at its next run; past
    the working-set limit the free memory is let go down to it."""
    import nnterp.backends.taps.device_rows as device_rows
    from nnterp.backends.taps.host_memory import BlockMemory, machine_share

    for working_set, fresh_at_second_run in ((16384, 0), (8192, 1), (0, 2)):
        memory, fresh = BlockMemory(keep=4096, working_set=working_set), []
        new = memory._new
        memory._new = lambda size: fresh.append(size) or new(size)
        for _ in range(2):  # three blocks at once, then all dropped
            fresh.clear()
            arrays = [memory.take(4096) for _ in range(3)]
            del arrays
        assert len(fresh) == fresh_at_second_run, working_set
        assert sum(owner.nbytes for owner in memory._free) == max(4096, min(3 * 4096, working_set))
    monkeypatch.setattr(device_rows, "register", lambda array: None)
    assert device_rows.MappedMemory().working_set == machine_share(16) > 0  # registered memory follows it


def test_fresh_memory_comes_with_the_next_blocks_faulted_in_ahead(monkeypatch):
    """Past the size limit, fresh memory is faulted in on another thread, the next arrays of about the size
    asked for already under way; an array of another size drops them; memory to be registered is, memory the
    copier threads write is not. Without madvise's populate, one write per page faults the pages in."""
    import nnterp.backends.taps.device_rows as device_rows
    import nnterp.backends.taps.host_memory as host_memory

    faulted: list[tuple[int, str]] = []

    def recorded(size: int) -> np.ndarray:
        faulted.append((size, threading.current_thread().name))
        return np.full(size, 7, dtype=np.uint8)

    monkeypatch.setattr(host_memory, "faulted_in", recorded)
    memory = host_memory.BlockMemory(keep=0, prefault=8192)
    assert memory.take(4096).nbytes == 4096 and not faulted  # small: allocated as it is asked for
    first = memory.take(16384)
    assert (first == 7).all() and first.nbytes == 16384
    second = memory.take(12000)  # about the same size: one made ahead serves it
    assert second.nbytes == 16384 and (second == 7).all()
    assert len(memory._prefaulter._coming) == host_memory.PREFAULT_AHEAD
    assert memory.take(65536).nbytes == 65536  # another size: those under way are not used
    assert {size for size, _ in memory._prefaulter._coming} == {65536}
    assert all(name.startswith("nnterp-prefault") for _, name in faulted)
    memory.clear()
    faulted.clear()
    plain = host_memory.BlockMemory(keep=0)  # copier threads fault their blocks in as they write them
    assert plain.take(host_memory.PREFAULT_BYTES).nbytes == host_memory.PREFAULT_BYTES and not faulted
    monkeypatch.setattr(device_rows, "register", lambda array: None)
    mapped = device_rows.MappedMemory(keep=0)  # registering would fault them in on the engine's thread
    assert mapped.take(host_memory.PREFAULT_BYTES).nbytes == host_memory.PREFAULT_BYTES and faulted
    mapped.clear()
    monkeypatch.undo()
    monkeypatch.setattr(host_memory, "_populate", lambda start, length: False)
    monkeypatch.setattr(np, "empty", lambda size, dtype: np.full(size, 9, dtype=dtype))
    touched = host_memory.faulted_in(3 * 4096 + 5)
    assert touched.nbytes == 3 * 4096 + 5 and (touched[::4096] == 0).all() and (touched[1:4096] == 9).all()


def test_prompts_placed_in_reused_memory_do_not_touch_the_rows_still_held(monkeypatch):
    """Extractions through one copier (an engine's), each filling blocks of its own: the first one's kept tensors
    keep their values while the others write; the memory of the second one's dropped tensors serves the later
    ones, whose rows are their own."""
    import gc

    import nnterp.backends.taps.rows as rows_module

    monkeypatch.setattr(rows_module, "BLOCK_PROMPTS", 3)
    transfer, copier = HostTransfer(), RowCopier(threads=2)

    def extraction(count: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        generator = torch.Generator().manual_seed(seed)
        prompts = [PromptRows(3) for _ in range(count)]
        steps = [torch.randn(2, count, 8, generator=generator) for _ in range(3)]
        for step, values in enumerate(steps):
            items = [prompt.add(row, 1, step, f"prompt {row}") for row, prompt in enumerate(prompts)]
            copier.copy(transfer.start(values), items)
        results = [copier.finish(prompt).result(timeout=30) for prompt in prompts]
        return results, [torch.stack([values[:, row] for values in steps], dim=1) for row in range(count)]

    kept, kept_expected = extraction(6, 0)
    dropped, _ = extraction(6, 1)
    pointers = {tensor.untyped_storage().data_ptr() for tensor in dropped}
    del dropped
    gc.collect()
    reused = set()
    for seed in (2, 3):
        results, expected = extraction(6, seed)
        assert all(torch.equal(result, reference) for result, reference in zip(results, expected))
        reused |= pointers & {tensor.untyped_storage().data_ptr() for tensor in results}
    assert all(torch.equal(result, reference) for result, reference in zip(kept, kept_expected))
    assert reused  # the dropped tensors' memory served a later extraction
    copier.close()


class SlowTransfer(InFlight):
    """A host buffer whose transfer is reported done only once ``arrived`` is set, as a GPU copy still running;
    it records which threads asked about it and when it was released."""

    def __init__(self, values: torch.Tensor):
        super().__init__(values)
        self.arrived, self.waited, self.released, self.cuda_threads = False, False, False, set()

    def done(self):
        self.cuda_threads.add(threading.get_ident())
        return self.arrived

    def wait(self):
        self.cuda_threads.add(threading.get_ident())
        self.waited = self.arrived = True

    def release(self):
        self.cuda_threads.add(threading.get_ident())
        self.released = True


def test_row_copier_hands_over_only_arrived_transfers_in_order_from_the_driving_thread():
    """Copier threads never ask about a transfer (a CUDA call): the driving thread hands a buffer over once it
    has arrived, in the order the buffers were given, waits only for the buffers holding the rows asked for, and
    releases a buffer once its rows are copied."""
    copier = RowCopier(threads=2)
    first, second = PromptRows(expected=2), PromptRows(expected=1)
    steps = [SlowTransfer(torch.randn(1, 2, 3)), SlowTransfer(torch.randn(1, 2, 3))]
    copier.copy(steps[0], [first.add(0, 1, 0, "prompt 0"), second.add(1, 1, 0, "prompt 1")])
    steps[1].arrived = True  # arrived before the first: still handed over after it
    copier.copy(steps[1], [first.add(0, 1, 1, "prompt 0")])
    assert not copier._copying  # nothing reached the copier threads yet
    second_rows = copier.finish(second).result(timeout=30)
    assert torch.equal(second_rows, steps[0].host()[:, 1:2]) and steps[0].waited
    rows = copier.finish(first).result(timeout=30)
    assert torch.equal(rows, torch.cat([steps[0].host()[:, :1], steps[1].host()[:, :1]], dim=1))
    assert not steps[1].waited  # it had arrived: handed over without waiting
    copier.hand_over()
    assert steps[0].released and steps[1].released
    assert {thread for step in steps for thread in step.cuda_threads} == {threading.get_ident()}
    copier.close()


def test_closing_the_copier_releases_the_buffers_no_copy_reads_any_more(monkeypatch):
    """Buffers whose copies ran serve the next extraction's transfers; one a copy still reads is not handed
    out again."""
    import nnterp.backends.taps.rows as rows_module

    copier, reading, stop = RowCopier(threads=2), threading.Event(), threading.Event()
    write = rows_module._write_blocks

    def slow_write(buffer, groups):
        if buffer is steps[0]:
            reading.set()
            stop.wait(30)
        write(buffer, groups)

    monkeypatch.setattr(rows_module, "_write_blocks", slow_write)
    steps = [SlowTransfer(torch.randn(1, 2, 3)) for _ in range(2)]
    running, done = PromptRows(expected=2), PromptRows(expected=2)  # on copier threads of their own
    copier.copy(steps[0], [running.add(0, 2, 0, "prompt 0")])
    copier.copy(steps[1], [done.add(0, 2, 0, "prompt 1")])
    copier.finish(done).result(timeout=30)
    assert reading.wait(30) and not steps[0].released and not steps[1].released
    copier.close()
    stop.set()
    assert steps[1].released and not steps[0].released


def test_extractions_of_one_model_reuse_its_host_memory_and_leave_held_results_intact(tiny_path, monkeypatch):
    """A model keeps its extraction memory: a later extraction takes no fresh memory once the earlier results
    are dropped, and results still held are never written over."""
    from nnterp.backends.taps.host_memory import BlockMemory

    model = StandardizedTransformer(str(tiny_path("llama")))
    held = list(model.extract(PROMPTS, accessors="layers_input", batch_size=2, progress=False))
    fresh = []
    new = BlockMemory._new
    monkeypatch.setattr(BlockMemory, "_new", lambda self, size: fresh.append(size) or new(self, size))
    for _ in range(2):  # each result dropped as it comes
        for result in model.extract(PROMPTS[::-1], accessors="layers_input", batch_size=2, progress=False):
            del result
    assert len(fresh) <= 2  # the first of these extractions may need more than the kept memory left free
    fresh.clear()
    for result in model.extract(PROMPTS[::-1], accessors="layers_input", batch_size=2, progress=False):
        del result
    assert fresh == []
    for result, prompt in zip(held, PROMPTS):
        reference = torch.stack(hidden_states_alone(model, prompt)[:model.num_layers])[:, 0]
        assert torch.allclose(result["layers_input"], reference, atol=1e-5), prompt


def test_a_buffer_is_not_read_before_its_transfer_is_done():
    flight = InFlight(torch.zeros(1, 2, 3))
    flight._event = object()  # a device-to-host copy still running
    with pytest.raises(RuntimeError, match="the copy to host memory is still running: wait\\(\\) first"):
        flight.host()


def test_host_transfer_reuses_the_smallest_free_block_that_fits():
    transfer = HostTransfer()
    small, large = torch.empty(64, dtype=torch.uint8), torch.empty(128, dtype=torch.uint8)
    transfer.give_back(large)
    transfer.give_back(small)
    assert transfer.block(50) is small
    assert transfer.block(100) is large


def test_row_copier_threads_follow_the_cpus_this_process_may_use(monkeypatch):
    """A container limited to 2 of a machine's 64 cores gets one copier thread, not the 4 the machine would."""
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert RowCopier().threads == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert RowCopier().threads == 4
