"""The served request format, checked without an engine: what parse_spec accepts and how it names what it
refuses; the server's side never loads nnsight; nnterp serve's defaults for vLLM's server."""

import json
import math
import subprocess
import sys

import pytest

from nnterp.backends.taps.spec import ModelFacts, RequestSpec, SpecError, parse_spec

FACTS = ModelFacts(num_layers=4, hidden_size=3)


def test_a_full_spec_round_trips_to_the_engine():
    spec = parse_spec({"steer": [{"layers": [-1, 0], "vector": [1, 2, 3], "factor": 2, "tokens": "generated"}],
                       "capture": [{"accessor": "mlps_output", "layers": 2}],
                       "ablate": [{"accessor": "attentions_output", "layers": [1], "mode": "mean"}],
                       "skip_layers": [[1, 2]]}, FACTS)
    assert spec.steer[0].layers == [0, 3] and spec.steer[0].vector == [1.0, 2.0, 3.0] and spec.steer[0].factor == 2.0
    assert spec.capture[0].tokens == "prompt" and spec.capture_names == ["mlps_output.2"]
    spec.handle = "h"
    again = RequestSpec.from_json(spec.to_json())
    assert again.to_json() == spec.to_json() and again.skip_layers == [(1, 2)]
    token = parse_spec({"steer": [{"layers": 1, "vector": {"token": " London"}}]}, FACTS).steer[0]
    assert token.vector is None and token.token == " London"


@pytest.mark.parametrize("data, param", [
    ([], "nnterp"),
    ({"steer": {}}, "nnterp.steer"),
    ({"steer": [{"layers": [4], "vector": [0, 0, 0]}]}, "nnterp.steer[0].layers"),
    ({"steer": [{"layers": [], "vector": [0, 0, 0]}]}, "nnterp.steer[0].layers"),
    ({"steer": [{"layers": [1, 1], "vector": [0, 0, 0]}]}, "nnterp.steer[0].layers"),
    ({"steer": [{"layers": [1], "vector": [0, 0]}]}, "nnterp.steer[0].vector"),
    ({"steer": [{"layers": [1], "vector": [0, math.nan, 0]}]}, "nnterp.steer[0].vector"),
    ({"steer": [{"layers": [1], "vector": [0, 0, 0], "factor": math.inf}]}, "nnterp.steer[0].factor"),
    ({"steer": [{"layers": [1], "vector": {"word": "x"}}]}, "nnterp.steer[0].vector"),
    ({"steer": [{"layers": [1], "vector": [0, 0, 0], "scale": 2}]}, "nnterp.steer[0].scale"),
    ({"capture": [{"accessor": "residual", "layers": [1]}]}, "nnterp.capture[0].accessor"),
    ({"capture": [{"accessor": "layers_output", "layers": [1], "tokens": "last"}]}, "nnterp.capture[0].tokens"),
    ({"capture": [{"accessor": "layers_output", "layers": [1]}, {"accessor": "layers_output", "layers": 1}]}, "nnterp.capture"),
    ({"ablate": [{"accessor": "mlps_output", "layers": [1], "mode": "random"}]}, "nnterp.ablate[0].mode"),
    ({"skip_layers": [[3, 1]]}, "nnterp.skip_layers[0]"),
    ({"skip_layers": [3]}, "nnterp.skip_layers[0]"),
])
def test_each_invalid_field_is_named(data, param):
    with pytest.raises(SpecError) as caught:
        parse_spec(data, FACTS)
    assert caught.value.param == param and str(caught.value).startswith(param)


def test_the_api_servers_side_loads_no_nnsight():
    """nnsight's patches break vLLM's streaming responses, so the middleware's module must not load it."""
    code = "import sys, nnterp.backends.vllm.server as s; s.serve_arguments('m', []); print('nnsight' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "False", run.stderr[-2000:]


def test_serve_defaults_and_what_the_user_overrides():
    from nnterp.backends.vllm.server import serve_arguments

    defaults = serve_arguments("m", ["--port", "9"])
    assert defaults[:4] == ["serve", "m", "--port", "9"]
    assert defaults[defaults.index("--host") + 1] == "127.0.0.1" and "--enforce-eager" in defaults
    assert "--no-enable-prefix-caching" in defaults and "nnterp.backends.vllm.server.NNterpMiddleware" in defaults
    given = serve_arguments("m", ["--host", "0.0.0.0", "--enable-prefix-caching"])
    assert given.count("--host") == 1 and "--no-enable-prefix-caching" not in given
    with pytest.raises(SystemExit, match="--no-enforce-eager serves CUDA graphs, which need an NVIDIA GPU"):
        serve_arguments("m", ["--no-enforce-eager"])


def test_serving_on_cuda_graphs_names_every_accessor_for_the_workers(monkeypatch):
    """``--no-enforce-eager`` on a GPU machine: breakable graphs, the workers told (merged into the user's own
    ``--additional-config``) to keep seams for every accessor, no ``--enforce-eager`` added, nnsight not loaded."""
    code = ("import json, sys, nnterp.backends.vllm.engine as e, nnterp.backends.vllm.server as s; "
            "e.no_accelerator = lambda: False; "
            "args = s.serve_arguments('m', ['--no-enforce-eager', '--additional-config', '{\"a\": 1}', "
            "'--compilation-config={\"level\": 0}']); "
            "import os; print(json.dumps([args, os.environ['VLLM_USE_BREAKABLE_CUDAGRAPH'], 'nnsight' in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    args, breakable, nnsight_loaded = json.loads(run.stdout.strip().splitlines()[-1])
    from nnterp.backends.taps.spec import ACCESSORS, GRAPH_ACCESSORS_KEY

    assert json.loads(args[args.index("--additional-config") + 1]) == {"a": 1, GRAPH_ACCESSORS_KEY: list(ACCESSORS)}
    assert args.count("--additional-config") == 1 and "--enforce-eager" not in args and "--no-enforce-eager" in args
    assert '--compilation-config={"level": 0}' in args  # the graph mode stays vLLM's (FULL graphs are made breakable)
    assert breakable == "1" and not nnsight_loaded


def test_serve_asks_for_the_instrumented_model_runner(monkeypatch):
    from nnterp.backends.vllm.server import V2_RUNNER, require_v1_model_runner

    monkeypatch.delenv(V2_RUNNER, raising=False)
    require_v1_model_runner()
    assert __import__("os").environ[V2_RUNNER] == "0"
    monkeypatch.setenv(V2_RUNNER, "1")
    with pytest.raises(SystemExit, match="V2 model runner, which carries no interventions"):
        require_v1_model_runner()


def test_steering_vector_rows_are_shared_held_and_reused():
    """The engine's table of distinct steering vectors: one row per distinct ``factor * vector``, held while a
    request uses it, reused once released, row 0 zeros (what unsteered rows gather)."""
    from types import SimpleNamespace

    import torch

    from nnterp.backends.vllm.served import SteeringVectors

    vectors = SteeringVectors()
    a, b, c = (SimpleNamespace(factor=f, vector=v) for f, v in ((2.0, [1.0, 2.0]), (1.0, [3.0, 4.0]), (1.0, [5.0, 6.0])))
    row_a, row_b = vectors.acquire(a), vectors.acquire(b)
    assert vectors.acquire(SimpleNamespace(factor=2.0, vector=[1.0, 2.0])) == row_a != row_b
    like = torch.zeros(1, 2, dtype=torch.float64)
    assert vectors.table(like).tolist() == [[0.0, 0.0], [2.0, 4.0], [3.0, 4.0]]
    vectors.release(row_a)
    assert vectors.acquire(c) != row_a  # row_a is still held by its second user
    vectors.release(row_a)
    row_d = vectors.acquire(SimpleNamespace(factor=-1.0, vector=[7.0, 8.0]))
    assert row_d == row_a and vectors.table(like)[row_d].tolist() == [-7.0, -8.0]
