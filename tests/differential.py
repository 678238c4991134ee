"""Differential fuzzing of the standardized surface against references that share none of its code.

A case is a random trace program: 1-4 prompts of different lengths split over 1-3 ``tracer.invoke``s, left or
right padding, float32 or bfloat16, and per invoke a few reads and writes at random layers through every
accessor (the six layer accessors, ``token_embeddings``, ``logits``, ``next_token_probs``), ``steer`` and
``skip_layers``, in forward order, ending with a read of the logits or next-token probabilities (so every
write is checked downstream). Reads are collected in one ``nnsight.save([])`` list shared by the invokes.

References, built only from forward hooks on the raw torch model (``model._module``), values copied when
the hook runs:
- ``batch``: the raw model on the very batch the trace fed it (exact up to float rounding);
- ``alone``: the raw model on each prompt alone, unpadded (float32 only: padding changes the rounding).
On vLLM every prompt is its own request and the reference is ``alone`` on the HF model of the same weights.

Values are compared per prompt on its real tokens. ``python scratch/fuzz.py`` runs many cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import nnsight
import torch

LAYER_ACCESSORS = ("layers_input", "attentions_input", "attentions_output", "mlps_input", "mlps_output", "layers_output")
ROLE_OF = {"layers": "layer", "attentions": "self_attn", "mlps": "mlp"}
WORDS = ("the", "capital", "of", "France", "is", "Paris", "and", "a", "cat", "sat", "on", "mat", "one", "two",
         "three", "river", "blue", "quickly", "model", "reads", "every", "layer", "hello", "world")
HF_ARCHITECTURES = ("llama", "gpt2", "falcon", "gpt_neox", "qwen2", "gemma2", "phi", "opt", "bloom", "olmo2", "cohere",
                    "pegasus", "llama4_text")  # llama4_text: a MoE block that returns its tokens flattened


# -- cases -------------------------------------------------------------------------------------------------

@dataclass
class Case:
    seed: int
    architecture: str
    prompts: list[str]
    invokes: list[list[int]]  # prompt indices of each invoke, in order
    padding_side: str
    dtype: torch.dtype
    programs: list[list[dict]] = field(default_factory=list)  # one list of ops per invoke

    def describe(self) -> str:
        ops = [[_describe_op(op) for op in program] for program in self.programs]
        return (f"seed={self.seed} {self.architecture} {str(self.dtype).removeprefix('torch.')} "
                f"padding={self.padding_side} prompts={self.prompts} invokes={self.invokes} programs={ops}")


def _describe_op(op: dict) -> str:
    where = op["target"] if op.get("layer") is None else f"{op['target']}[{op['layer']}]"
    extra = f"..{op['end']}" if op["kind"] == "skip" else (f" positions={op['positions']}" if op.get("positions") is not None else "")
    return f"{op['kind']} {where}{extra}"


@dataclass(frozen=True)
class Surface:
    """What programs may touch on one model: its layer count, width, and each (accessor, layer) location
    numbered in the order a forward pass reaches it (read off a hooked forward of the raw model)."""

    num_layers: int
    hidden_size: int
    sequence: dict[tuple[str, int], int]


def make_case(seed: int, architecture: str, surface: Surface, *, one_prompt_per_invoke: bool = False,
              dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float32, torch.float32, torch.bfloat16)) -> Case:
    rng = random.Random(f"nnterp-fuzz-{seed}")  # hashed: consecutive integer seeds give correlated draws
    count = rng.randint(1, 3) if one_prompt_per_invoke else rng.randint(1, 4)
    lengths = rng.sample(range(1, 9), count)  # different lengths, so batches are padded
    prompts = [" ".join(rng.choice(WORDS) for _ in range(length)) for length in lengths]
    if one_prompt_per_invoke:
        invokes = [[i] for i in range(count)]
    else:
        cuts = sorted(rng.sample(range(1, count), rng.randint(0, min(2, count - 1)))) if count > 1 else []
        bounds = [0, *cuts, count]
        invokes = [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]
    case = Case(seed, architecture, prompts, invokes, rng.choice(("left", "right")), rng.choice(dtypes))
    case.programs = [_program(rng, surface, alone=len(invokes) == 1) for _ in invokes]
    return case


def _location_key(surface: Surface, target: str, layer: int | None) -> int:
    if target == "token_embeddings":
        return -1
    if target in ("logits", "next_token_probs"):
        return len(surface.sequence)
    return surface.sequence[target, layer]


def _program(rng: random.Random, surface: Surface, alone: bool) -> list[dict]:
    n = surface.num_layers
    ops = []
    skipped: tuple[int, int] | None = None
    if alone and rng.random() < 0.15:
        first = rng.randrange(n)
        skipped = (first, rng.randrange(first, n))
    locations = sorted(surface.sequence, key=surface.sequence.get) + [("token_embeddings", None)]
    for _ in range(rng.randint(1, 4)):
        target, layer = rng.choice(locations)
        if skipped and layer is not None and skipped[0] <= layer <= skipped[1]:
            continue  # a skipped layer's modules do not run
        kind = rng.choice(("read", "read", "write"))
        op = {"kind": kind, "target": target, "layer": layer}
        if kind == "write":
            op["vector"] = _vector(rng, surface.hidden_size)
        ops.append(op)
    if rng.random() < 0.3:
        layer = rng.randrange(n)
        if ("layers_output", layer) in surface.sequence and not (skipped and skipped[0] <= layer <= skipped[1]):
            positions = None if rng.random() < 0.5 else rng.choice((0, -1, [0, -1]))
            ops.append({"kind": "steer", "target": "layers_output", "layer": layer, "vector": _vector(rng, surface.hidden_size),
                        "factor": rng.choice((0.5, 2.0)), "positions": positions})
    if skipped and all(("layers_output", layer) in surface.sequence for layer in range(skipped[0], skipped[1] + 1)):
        ops.append({"kind": "skip", "target": "layers_input", "layer": skipped[0], "end": skipped[1]})
        if rng.random() < 0.5:
            ops.append({"kind": "read", "target": "layers_output", "layer": skipped[1]})
    ops.sort(key=lambda op: (_location_key(surface, op["target"], op["layer"]), op["kind"] == "skip"))
    ops.append({"kind": "read", "target": rng.choice(("logits", "next_token_probs")), "layer": None})
    return ops


def _vector(rng: random.Random, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    return torch.randn(width, generator=generator)


# -- the program, run through nnterp -----------------------------------------------------------------------

def read_value(model, target: str, layer: int | None):
    if layer is None:
        return getattr(model, target)
    return getattr(model, target)[layer]


def run_program(model, program: list[dict], results: list, invoke: int) -> None:
    """A program's ops inside a trace body; reads go to ``results`` as ``(invoke, op index, value)``."""
    for index, op in enumerate(program):
        kind, target, layer = op["kind"], op["target"], op["layer"]
        if kind == "read":
            results.append((invoke, index, read_value(model, target, layer)))
        elif kind == "write":
            value = read_value(model, target, layer)
            new = value + op["vector"].to(value.dtype)
            if layer is None:
                setattr(model, target, new)
            else:
                getattr(model, target)[layer] = new
        elif kind == "steer":
            model.steer(layer, op["vector"], factor=op["factor"], positions=op["positions"])
        elif kind == "skip":
            model.skip_layers(layer, op["end"])


def run_nnterp(model, case: Case) -> dict[tuple[int, int], torch.Tensor]:
    with torch.no_grad(), model.trace() as tracer:
        results = nnsight.save([])
        for invoke, (indices, program) in enumerate(zip(case.invokes, case.programs)):
            prompts = [case.prompts[i] for i in indices]
            with tracer.invoke(prompts if model._backend.batches_prompts else prompts[0]):
                run_program(model, program, results, invoke)
    keys = [(invoke, index) for invoke, index, _ in results]
    wanted = [(invoke, index) for invoke, program in enumerate(case.programs)
              for index, op in enumerate(program) if op["kind"] == "read"]
    if sorted(keys) != wanted:
        raise AssertionError(f"the shared list holds reads {keys}, the program made {wanted}")
    if not model._backend.batches_prompts and keys != wanted:  # vLLM: each request's list, in invoke order
        raise AssertionError(f"reads came back out of invoke order: {keys}")
    return {(invoke, index): value for invoke, index, value in results}


# -- references: forward hooks on the raw model ------------------------------------------------------------

def _hidden_index(values: list, width: int) -> int | None:
    for index, value in enumerate(values):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.ndim >= 2 and value.shape[-1] == width:
            return index
    return None


class Hooks:
    """Ops at module locations of the raw model, applied by forward (pre-)hooks to each invoke's rows."""

    def __init__(self, model, width: int, attention_mask: torch.Tensor | None = None, batch: int | None = None) -> None:
        self.model, self.width, self.attention_mask = model, width, attention_mask
        self.batch = batch  # the forward's prompts: a module's [batch * seq, hidden] value is viewed per prompt
        self.events: dict[tuple, list] = {}
        self.results: dict[tuple[int, int], torch.Tensor] = {}
        self.handles: list = []

    def module(self, target: str, layer: int | None) -> torch.nn.Module:
        names = self.model.names
        if target == "token_embeddings":
            return self.model._module.get_submodule(names.embed_tokens)
        layer_module = self.model._module.get_submodule(names.layers)[layer]
        role = ROLE_OF[target.split("_")[0]]
        return layer_module if role == "layer" else getattr(layer_module, getattr(names, role))

    def add(self, rows: slice, invoke: int, program: list[dict]) -> None:
        for index, op in enumerate(program):
            if op["target"] in ("logits", "next_token_probs"):
                continue
            if op["kind"] == "skip":
                start, end = op["layer"], op["end"]
                stream: dict = {}
                self._event(("layers_input", start), (rows, "capture", stream, None))
                for layer in range(start, end + 1):
                    self._event(("layers_output", layer), (rows, "replace", stream, None))
                continue
            self._event((op["target"], op["layer"]), (rows, op["kind"], op, (invoke, index)))

    def _event(self, location: tuple, event: tuple) -> None:
        self.events.setdefault(location, []).append(event)

    def _apply(self, location: tuple, value: torch.Tensor) -> torch.Tensor:
        if value.ndim == 2 and self.batch is not None:  # tokens flattened by the module (Llama 4's MoE)
            flat_shape = value.shape
            return self._apply_per_prompt(location, value.reshape(self.batch, -1, flat_shape[-1])).reshape(flat_shape)
        return self._apply_per_prompt(location, value)

    def _apply_per_prompt(self, location: tuple, value: torch.Tensor) -> torch.Tensor:
        for rows, kind, payload, key in self.events.get(location, ()):
            if kind == "read":
                self.results[key] = value[rows].clone()
            elif kind == "capture":
                payload["value"] = value[rows].clone()
            else:
                value = value.clone()
                if kind == "replace":
                    value[rows] = payload["value"]
                elif kind == "write":
                    value[rows] += payload["vector"].to(value.dtype)
                else:  # steer
                    delta = (payload["factor"] * payload["vector"]).to(value.dtype)
                    positions = payload["positions"]
                    if positions is None:
                        value[rows] += delta
                    else:  # each prompt's own tokens: index its real (unpadded) positions
                        for row in range(value.shape[0])[rows]:
                            real = torch.arange(value.shape[1]) if self.attention_mask is None else self.attention_mask[row].nonzero().flatten()
                            value[row, real[torch.as_tensor(positions)]] += delta
        return value

    def __enter__(self) -> "Hooks":
        for target, layer in self.events:
            module = self.module(target, layer)
            if target.endswith("_input"):
                self.handles.append(module.register_forward_pre_hook(self._pre(target, layer), with_kwargs=True))
            else:
                self.handles.append(module.register_forward_hook(self._post(target, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _pre(self, target, layer):
        def hook(module, args, kwargs):
            values = [*args, *kwargs.values()]
            index = _hidden_index(values, self.width)
            new = self._apply((target, layer), values[index])
            if index < len(args):
                return args[:index] + (new,) + args[index + 1:], kwargs
            key = list(kwargs)[index - len(args)]
            return args, {**kwargs, key: new}
        return hook

    def _post(self, target, layer):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                return self._apply((target, layer), output)
            index = _hidden_index(list(output), self.width)
            new = self._apply((target, layer), output[index])
            return type(output)(new if i == index else item for i, item in enumerate(output))
        return hook


def fed_batch(model, prompts: list[str]) -> tuple[tuple, dict]:
    """The inputs a trace over ``prompts`` (one invoke each or one list) gives the raw model."""
    with torch.no_grad(), model.trace(prompts if len(prompts) > 1 else prompts[0]):
        fed = model.inputs.save()
    return fed


def run_reference(model, case: Case, groups: list[tuple[list[int], slice]], inputs: tuple[tuple, dict]) -> tuple[dict, torch.Tensor]:
    """The reads of ``case`` (restricted to the invokes in ``groups``: (invoke, rows) pairs) from one raw
    forward on ``inputs``; returns them and the logits."""
    input_ids = inputs[1].get("input_ids", inputs[0][0] if inputs[0] else None)
    hooks = Hooks(model, model.hidden_size, inputs[1].get("attention_mask"), input_ids.shape[0])
    for invoke, rows in groups:
        hooks.add(rows, invoke, case.programs[invoke])
    args, kwargs = inputs
    with torch.no_grad(), hooks:
        logits = model._module(*args, **kwargs, use_cache=False).logits
    results = dict(hooks.results)
    for invoke, rows in groups:
        for index, op in enumerate(case.programs[invoke]):
            if op["target"] in ("logits", "next_token_probs"):
                results[(invoke, index)] = logits[rows]
    return results, logits


# -- comparison, per prompt on its real tokens -------------------------------------------------------------

def _last_real(mask: torch.Tensor) -> torch.Tensor:
    return mask.shape[-1] - 1 - mask.flip(-1).long().argmax(-1)


def per_prompt(value: torch.Tensor, target: str, mask: torch.Tensor | None) -> list[torch.Tensor]:
    """A batch value as one tensor per prompt over its real tokens (``next_token_probs``: its vector)."""
    if target == "next_token_probs":
        return list(value.float())
    if mask is None:  # a vLLM request: flat [tokens, ...] (or [1, tokens, ...])
        return [(value if value.ndim == 2 else value[0]).float()]
    if tuple(value.shape[:2]) != tuple(mask.shape):  # not [batch, seq, ...]: reported as a shape mismatch
        return [value.float()] * mask.shape[0]
    return [value[row][mask[row].bool()].float() for row in range(value.shape[0])]


def reference_per_prompt(value: torch.Tensor, target: str, mask: torch.Tensor) -> list[torch.Tensor]:
    if target == "next_token_probs":
        rows = torch.arange(value.shape[0])
        return list(value[rows, _last_real(mask)].float().softmax(-1))
    return [value[row][mask[row].bool()].float() for row in range(value.shape[0])]


@dataclass
class Mismatch:
    case: Case
    reference: str
    op: str
    prompt: int
    diff: float
    scale: float

    def __str__(self) -> str:
        return (f"{self.op} (prompt {self.prompt}) differs from the {self.reference} reference: max abs diff "
                f"{self.diff:.3g} on magnitudes {self.scale:.3g}\n  {self.case.describe()}")


def compare(case: Case, got: dict, expected: dict, masks: dict, reference: str, rtol: float, invokes: list[int],
            last_only_logits: bool = False) -> tuple[list[Mismatch], float]:
    """Mismatches of every read of ``invokes`` (per prompt); also the largest relative difference seen."""
    mismatches, worst = [], 0.0
    for invoke in invokes:
        program = case.programs[invoke]
        for index, op in enumerate(program):
            if op["kind"] != "read":
                continue
            target = op["target"]
            ours = per_prompt(got[(invoke, index)], target, masks.get(("ours", invoke)))
            theirs = reference_per_prompt(expected[(invoke, index)], target, masks[("reference", invoke)])
            for prompt, (a, b) in enumerate(zip(ours, theirs, strict=True)):
                if target == "logits" and last_only_logits:
                    b = b[-1:]
                if a.shape != b.shape:
                    diff, scale = float("inf"), 0.0
                else:
                    diff = (a - b).abs().max().item() if a.numel() else 0.0
                    scale = max(b.abs().max().item() if b.numel() else 0.0, 1e-6)
                relative = diff / max(scale, 1e-6)
                worst = max(worst, relative)
                if not relative <= rtol:
                    mismatches.append(Mismatch(case, reference, _describe_op(op), case.invokes[invoke][prompt], diff, scale))
    return mismatches, worst


# -- running cases -----------------------------------------------------------------------------------------

def surface_of(model) -> Surface:
    """Every (accessor, layer) location of a model, numbered in the order a plain forward reaches them; a layer
    without the module (a hybrid model's), or whose module other layers share, offers none."""
    hooks = Hooks(model, model.hidden_size)
    modules = {}
    for name in LAYER_ACCESSORS:
        role = ROLE_OF[name.split("_")[0]]
        if role != "layer" and getattr(model.names, role) is None:
            continue
        for layer in range(model.num_layers):
            try:
                modules[name, layer] = hooks.module(name, layer)
            except AttributeError:
                continue
    owners: dict[int, set[int]] = {}
    for (name, layer), module in modules.items():
        owners.setdefault(id(module), set()).add(layer)
    sequence: dict[tuple[str, int], int] = {}
    handles = []
    for (name, layer), module in modules.items():
        if len(owners[id(module)]) > 1:
            continue

        def note(*hook_args, location=(name, layer)) -> None:
            sequence.setdefault(location, len(sequence))

        register = module.register_forward_pre_hook if name.endswith("_input") else module.register_forward_hook
        handles.append(register(note))
    try:
        args, kwargs = fed_batch(model, ["hello world"])
        with torch.no_grad():
            model._module(*args, **kwargs, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return Surface(model.num_layers, model.hidden_size, sequence)


def check_hf_case(model, case: Case) -> tuple[list[Mismatch], dict]:
    """``case`` on a StandardizedTransformer against the ``batch`` and (float32) ``alone`` references. A model
    whose positions left padding shifts must refuse a left-padded batch instead."""
    default_side = model.tokenizer.padding_side
    model.tokenizer.padding_side = case.padding_side
    try:
        if case.padding_side == "left" and model.left_padding_shifts_positions and _padded(model, case):
            return _refused_left_padding(model, case), {}
        got = run_nnterp(model, case)
        inputs = fed_batch(model, case.prompts)
    finally:
        model.tokenizer.padding_side = default_side
    mask = inputs[1]["attention_mask"]
    masks, groups = {}, []
    row = 0
    for invoke, indices in enumerate(case.invokes):
        rows = slice(row, row + len(indices))
        groups.append((invoke, rows))
        masks[("ours", invoke)] = masks[("reference", invoke)] = mask[rows]
        row += len(indices)
    expected, _ = run_reference(model, case, groups, inputs)
    invokes = list(range(len(case.invokes)))
    batch_tolerance = 1e-5 if case.dtype == torch.float32 else 1e-2
    mismatches, worst_batch = compare(case, got, expected, masks, "batch", batch_tolerance, invokes)
    worst = {"batch": worst_batch}
    if case.dtype == torch.float32:
        found, worst["alone"] = compare_alone(case, got, alone_references(model, case), masks, rtol=1e-4)
        mismatches += found
    return mismatches, worst


def _padded(model, case: Case) -> bool:
    return len({len(model.tokenizer(prompt)["input_ids"]) for prompt in case.prompts}) > 1


def _refused_left_padding(model, case: Case) -> list[Mismatch]:
    try:
        run_nnterp(model, case)
    except ValueError as error:
        if "Pad on the right" in str(error):
            return []
        raise
    return [Mismatch(case, "left-padding refusal", "the trace", 0, float("inf"), 0.0)]


GENERATED_TOKENS = 3


def greedy_alone(model, prompt: str, max_new_tokens: int = GENERATED_TOKENS) -> list[int]:
    """A plain decode loop on the raw HF model: the prompt alone, each step's token the argmax of the logits
    (full forward passes, no cache), up to the end-of-sequence token."""
    eos = set(torch.as_tensor(model._module.generation_config.eos_token_id or []).reshape(-1).tolist())
    tokens = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
    generated = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model._module(input_ids=tokens).logits[0, -1].argmax())
            generated.append(token)
            if token in eos:
                break
            tokens = torch.cat([tokens, torch.tensor([[token]])], dim=1)
    return generated


def check_hf_generation(model, case: Case) -> tuple[list[Mismatch], bool]:
    """Greedy generation of the case's prompts as one batch (padded on the case's side, one invoke per group)
    against each prompt alone in :func:`greedy_alone`; a right-padded batch of prompts of different lengths
    must be refused with nnterp's specific error instead (generation would continue a shorter prompt after its
    padding). Returns the mismatches and whether the batch was generated (rather than refused)."""
    side, model.tokenizer.padding_side = model.tokenizer.padding_side, case.padding_side
    try:
        with torch.no_grad(), model.generate(**model.greedy_generation_kwargs(GENERATED_TOKENS)) as tracer:
            outputs = nnsight.save([])
            for indices in case.invokes:
                with tracer.invoke([case.prompts[i] for i in indices]):
                    outputs.append(tracer.result)  # this invoke's rows
    except ValueError as error:
        refused = "right-padded batch" in str(error) or "Pad on the right" in str(error)
        expected_refusal = _padded(model, case) and (case.padding_side == "right" or model.left_padding_shifts_positions)
        if refused and expected_refusal:
            return [], False
        raise
    finally:
        model.tokenizer.padding_side = side
    eos = set(torch.as_tensor(model._module.generation_config.eos_token_id or []).reshape(-1).tolist())
    prompt_width = max(len(model.tokenizer(prompt)["input_ids"]) for prompt in case.prompts)
    mismatches = []
    rows = [(output, row, prompt_index) for output, indices in zip(outputs, case.invokes)
            for row, prompt_index in enumerate(indices)]
    for output, row, prompt_index in rows:
        expected = greedy_alone(model, case.prompts[prompt_index])
        got = _until_eos(output[row, prompt_width:].tolist(), eos)
        if got != expected:
            mismatches.append(Mismatch(case, "greedy alone", f"generate {got} != {expected}", prompt_index, float("inf"), 0.0))
    return mismatches, True


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[: index + 1]
    return tokens


def alone_references(reference_model, case: Case) -> dict[tuple[int, int], tuple[dict, torch.Tensor]]:
    """Each prompt of ``case`` run alone on ``reference_model`` (HF) with its invoke's program: (invoke, position
    in the invoke) -> (its reads, its attention mask)."""
    references = {}
    for invoke, indices in enumerate(case.invokes):
        for position, prompt_index in enumerate(indices):
            inputs = ((), dict(reference_model.tokenizer(case.prompts[prompt_index], return_tensors="pt")))
            expected, _ = run_reference(reference_model, case, [(invoke, slice(0, 1))], inputs)
            references[invoke, position] = expected, inputs[1]["attention_mask"]
    return references


def compare_alone(case: Case, got: dict, references: dict, masks: dict, rtol: float, last_only_logits: bool = False):
    """Every read of ``got`` against :func:`alone_references`; ``masks`` holds our batch's masks (none on vLLM,
    one unpadded prompt per invoke)."""
    mismatches, worst = [], 0.0
    for (invoke, position), (expected, reference_mask) in references.items():
        mask = masks.get(("ours", invoke))
        row = {key: value if mask is None else value[position:position + 1]
               for key, value in got.items() if key[0] == invoke}
        row_masks = {("reference", invoke): reference_mask}
        if mask is not None:
            row_masks[("ours", invoke)] = mask[position:position + 1]
        found, seen = compare(case, row, expected, row_masks, "alone", rtol, [invoke], last_only_logits)
        for mismatch in found:
            mismatch.prompt = case.invokes[invoke][position]
        mismatches += found
        worst = max(worst, seen)
    return mismatches, worst


def inject_engine_failure(vllm_model, layer: int) -> None:
    """Make decoder layer ``layer`` of the (in-process) engine raise in its next forward pass, once: an error
    raised by vLLM's own module, which the engine must survive."""
    def install(worker):
        state = {"armed": True}

        def fail(module, args):
            if state["armed"]:
                state["armed"] = False
                raise RuntimeError("injected failure of a vLLM module")

        worker.model_runner.get_model().get_submodule(vllm_model.names.layers)[layer].register_forward_pre_hook(fail)

    vllm_model.vllm_entrypoint.llm_engine.collective_rpc(install)


def failing_trace(vllm_model, case: Case) -> None:
    """A trace of the case's first prompt (reading a layer, so interventions run) during which the engine's
    module fails; raises the error the caller gets."""
    inject_engine_failure(vllm_model, vllm_model.num_layers - 1)
    with torch.no_grad(), vllm_model.trace(case.prompts[0]):
        vllm_model.layers_output[0].save()
        vllm_model.logits.save()


def check_vllm_case(vllm_model, case: Case, references: dict) -> tuple[list[Mismatch], dict]:
    """``case`` (one prompt per invoke) on a StandardizedVLLM against :func:`alone_references` computed on the
    HF model of the same weights (before the engine started: vLLM's Transformers backend patches the HF
    classes it wraps)."""
    got = run_nnterp(vllm_model, case)
    found, worst = compare_alone(case, got, references, {}, rtol=1e-4, last_only_logits=True)
    return found, {"alone": worst}


def summarize(results: list[tuple[Case, list[Mismatch], dict]]) -> str:
    cases = len(results)
    failing = [(case, found) for case, found, _ in results if found]
    worst: dict[str, float] = {}
    for _, _, seen in results:
        for name, value in seen.items():
            worst[name] = max(worst.get(name, 0.0), value)
    reads = sum(1 for case, _, _ in results for program in case.programs for op in program if op["kind"] == "read")
    lines = [f"{cases} cases, {reads} reads compared, {len(failing)} cases with mismatches; largest relative "
             f"difference per reference: " + ", ".join(f"{name} {value:.2g}" for name, value in sorted(worst.items()))]
    for case, found in failing[:20]:
        lines += [str(mismatch) for mismatch in found[:3]]
    return "\n".join(lines)



def check_cache_case(model, surface: Surface, case: Case) -> tuple[list[Mismatch], float]:
    """``run_with_cache`` over ``case``'s prompts (its padding side, every layer accessor at every layer and the
    logits) against each prompt run alone on the raw model (float32)."""
    present = [target for target in LAYER_ACCESSORS if (target, 0) in surface.sequence]
    reads = [{"kind": "read", "target": target, "layer": layer} for layer in range(model.num_layers) for target in present]
    reads.append({"kind": "read", "target": "logits", "layer": None})
    case = Case(case.seed, case.architecture, case.prompts, [list(range(len(case.prompts)))], case.padding_side,
                torch.float32, [reads])
    default_side = model.tokenizer.padding_side
    model.tokenizer.padding_side = case.padding_side
    try:
        if case.padding_side == "left" and model.left_padding_shifts_positions and _padded(model, case):
            case.padding_side = model.tokenizer.padding_side = "right"
        logits, cache = model.run_with_cache(case.prompts, names=present)
    finally:
        model.tokenizer.padding_side = default_side
    got = {(0, index): logits if op["target"] == "logits" else cache[op["target"], op["layer"]]
           for index, op in enumerate(reads)}
    masks = {("ours", 0): cache.attention_mask, ("reference", 0): cache.attention_mask}
    return compare_alone(case, got, alone_references(model, case), masks, rtol=1e-4)


# -- extraction ----------------------------------------------------------------------------------------------

def check_extraction_case(model, reference_model, surface: Surface, case: Case, *,
                          engine_sampling: bool = False) -> tuple[list[Mismatch], float]:
    """``model.extract`` of the case's prompts (a random few accessors and layers, 0-3 generated tokens, small
    batches or windows so prompts finish in different steps) against ``reference_model`` (HF) run on each
    prompt's token ids alone with forward hooks; every generated token but the last must be the reference's
    greedy choice on those tokens (unless the top two logits tie), and a generation shorter than asked must end
    with the end-of-sequence token (which must not appear before). ``engine_sampling``: vLLM's ``ignore_eos`` may be drawn as well."""
    rng = random.Random(f"nnterp-extract-{case.seed}")
    num_layers = surface.num_layers
    present = [name for name in LAYER_ACCESSORS if all((name, layer) in surface.sequence for layer in range(num_layers))]
    accessors = tuple(rng.sample(present, rng.randint(1, min(3, len(present)))))
    layers = sorted(rng.sample(range(num_layers), rng.randint(1, num_layers)))
    max_new_tokens = rng.choice((0, 1, 3))
    options = {"batch_size": rng.randint(1, 3)}  # HF: prompts per forward pass; vLLM: prompts queued ahead
    if engine_sampling and max_new_tokens and rng.random() < 0.5:
        options["ignore_eos"] = True
    results = list(model.extract(case.prompts, accessors=accessors, layers=layers, max_new_tokens=max_new_tokens,
                                 progress=False, **options))
    eos = set(torch.as_tensor(reference_model._module.generation_config.eos_token_id or []).reshape(-1).tolist())
    label = f"extract {list(accessors)} layers {layers} new={max_new_tokens} {options}"
    mismatches, worst = [], 0.0
    for index, result in enumerate(results):
        if result.index != index:
            mismatches.append(Mismatch(case, "prompt order", f"{label}: result {index} is prompt {result.index}", index, float("inf"), 0.0))
            continue
        hooks = Hooks(reference_model, reference_model.hidden_size, None, 1)
        program = [{"kind": "read", "target": accessor, "layer": layer} for accessor in accessors for layer in layers]
        hooks.add(slice(0, 1), 0, program)
        with torch.no_grad(), hooks:
            logits = reference_model._module(input_ids=torch.tensor([result.token_ids]), use_cache=False).logits[0]
        for position, op in enumerate(program):
            ours = result[op["target"]][layers.index(op["layer"])].float()
            theirs = hooks.results[(0, position)][0].float()
            diff = (ours - theirs).abs().max().item() if ours.shape == theirs.shape else float("inf")
            scale = max(theirs.abs().max().item(), 1e-6)
            worst = max(worst, diff / scale)
            if not diff / scale <= 1e-4:
                mismatches.append(Mismatch(case, "alone", f"{label}: {_describe_op(op)}", index, diff, scale))
        prompt_length = len(result.token_ids) - max(len(result.generated) - 1, 0)
        for step, token in enumerate(result.generated):
            top = logits[prompt_length - 1 + step].topk(2).values
            if token != int(logits[prompt_length - 1 + step].argmax()) and float(top[0] - top[1]) > 1e-4:
                mismatches.append(Mismatch(case, "greedy", f"{label}: generated token {step}", index, float("inf"), 0.0))
        if not options.get("ignore_eos") and any(token in eos for token in result.generated[:-1]):
            mismatches.append(Mismatch(case, "generation", f"{label}: generated past the end of sequence", index, float("inf"), 0.0))
        if not options.get("ignore_eos") and len(result.generated) < max_new_tokens and (
                not result.generated or result.generated[-1] not in eos):
            mismatches.append(Mismatch(case, "generation", f"{label}: {len(result.generated)} tokens, no end of sequence", index, float("inf"), 0.0))
        if options.get("ignore_eos") and len(result.generated) != max_new_tokens:
            mismatches.append(Mismatch(case, "generation", f"{label}: {len(result.generated)} tokens with ignore_eos", index, float("inf"), 0.0))
    if len(results) != len(case.prompts):
        mismatches.append(Mismatch(case, "prompts", f"{label}: {len(results)} results", -1, float("inf"), 0.0))
    return mismatches, worst
