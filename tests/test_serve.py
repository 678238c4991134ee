"""``nnterp serve``: vLLM's OpenAI-compatible server on the CPU engine, started on a free loopback port by this
module and stopped after. Steering and captures equal forward hooks on the HF model of the same weights and a
StandardizedVLLM trace; 32 concurrent requests equal each sent alone; streaming; every bad request is a 4xx naming
its field; the API key; large captures under a handle; the server answering after an engine-side failure."""

import concurrent.futures
import json
import math
import urllib.request

import pytest
import torch
from harness.server import running_server
from hf_reference import add_to_stream, outputs_with_hooks
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from nnterp.client import Client, ServerError  # noqa: E402

KEY = "test-key"
PROMPT = "The capital of France is"
ARGUMENTS = ["--dtype", "float32", "--max-model-len", "256", "--worker-cls", "harness.faults.FaultyCPUWorker"]
ENV = {"NNTERP_SERVE_INLINE_BYTES": str(64 << 10), "NNTERP_SERVE_MAX_CAPTURE_BYTES": str(256 << 10),
       "VLLM_SERVER_DEV_MODE": "1"}


@pytest.fixture(scope="module")
def server(tiny_path, tmp_path_factory):
    path = str(tiny_path("llama"))
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(path, ARGUMENTS, env=ENV, api_key=KEY, log=log) as url:
        yield url, path


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], api_key=KEY)


@pytest.fixture(scope="module")
def hf(server):
    path = server[1]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def vector(seed: int, width: int = 128, scale: float = 4.0) -> list[float]:
    return (torch.randn(width, generator=torch.Generator().manual_seed(seed)) * scale).tolist()


def hf_streams(hf, token_ids: list[int], steer: dict[int, torch.Tensor], read: list[int]) -> dict[int, torch.Tensor]:
    """Each layer in ``read``'s output on ``token_ids`` (one forward of the raw HF model), ``steer[layer]`` added to
    that layer's output by a hook: the reference, sharing no code with nnterp."""
    layers = hf[0].model.layers
    seen = hf_with_hooks(hf, token_ids, {layers[index]: add_to_stream(vector) for index, vector in steer.items()})
    return {layer: seen[layer] for layer in read}


def close(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    return ours.shape == reference.shape and bool((ours - reference).abs().max() <= 1e-4 * reference.abs().max())


def test_steer_and_capture_equal_hf_hooks_and_a_trace(client, hf, server):
    """Steering layer 0 by a vector and layer 1 by the ' the' token's LM-head row, capturing layers_output at
    1 and 2 over the prompt and the generated tokens: the HF model with the same additions by hooks, on the
    same tokens, gives the same streams; a StandardizedVLLM trace of the prompt gives the same prompt rows."""
    model, tokenizer = hf
    direction = vector(1)
    result = client.complete(PROMPT, max_tokens=3, return_token_ids=True,
                             steer=[{"layers": [0], "vector": direction, "factor": 2.0},
                                    {"layers": [1], "vector": {"token": " the"}, "factor": 0.5}],
                             capture=[{"accessor": "layers_output", "layers": [1, 2], "tokens": "all"}])
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    generated = result.response["choices"][0]["token_ids"]
    the = model.lm_head.weight[tokenizer.encode(" the", add_special_tokens=False)[0]].detach()
    steer = {0: 2.0 * torch.tensor(direction), 1: 0.5 * the}
    expected = hf_streams(hf, prompt_ids + generated[:-1], steer, [1, 2])
    assert result.captures["layers_output", 1].shape == (len(prompt_ids) + len(generated) - 1, 128)
    for layer in (1, 2):
        assert close(result.captures["layers_output", layer], expected[layer]), layer
    unsteered = hf_streams(hf, prompt_ids, {}, [2])[2]
    assert not close(result.captures["layers_output", 2][: len(prompt_ids)], unsteered), "steering must change it"

    from nnterp.standardized.vllm import StandardizedVLLM

    with StandardizedVLLM(server[1], dtype="float32", max_model_len=256) as engine:
        with torch.no_grad(), engine.trace(PROMPT):
            engine.steer(0, torch.tensor(direction), factor=2.0)
            engine.steer(1, the, factor=0.5)
            traced = engine.layers_output[2].save()
    assert close(result.captures["layers_output", 2][: len(prompt_ids)], traced)


def request(index: int) -> dict:
    accessor = ("layers_output", "mlps_output", "attentions_output")[index % 3]
    return {"prompt": f"{PROMPT} {'one two three'[: index % 13]}", "max_tokens": 2 + index % 3,
            "steer": [{"layers": [index % 3], "vector": vector(100 + index), "factor": 1.0 + index % 4}],
            "capture": [{"accessor": accessor, "layers": [(index + 1) % 3], "tokens": "all"}]}


def test_concurrent_requests_each_equal_their_result_alone(client):
    """32 requests at once, each with its own steering vector and capture: each equals that request sent alone
    (no cross-talk between rows of one batch, nothing lost)."""
    def send(index: int):
        spec = request(index)
        prompt = spec.pop("prompt")
        max_tokens = spec.pop("max_tokens")
        return client.complete(prompt, max_tokens=max_tokens, **spec)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        together = list(pool.map(send, range(32)))
    for index in range(32):
        alone = send(index)
        assert together[index].text == alone.text, index
        assert set(together[index].captures) == set(alone.captures)
        for name, value in alone.captures.items():
            assert close(together[index].captures[name], value), (index, name)
    assert len({r.text for r in together}) > 1


def test_steering_batched_over_concurrent_requests_equals_hf_hooks(client, hf):
    """Requests steered in the same engine steps (one gather of every request's vector per layer): two entries
    on one layer add up, a vector shared by two requests, steering only the prompt's or only the generated
    tokens. Each request's captured last layer equals the HF model steered by hooks on the same tokens."""
    model, tokenizer = hf
    specs = [[{"layers": [1], "vector": vector(7), "factor": 1.0}, {"layers": [1], "vector": vector(8), "factor": 0.5}],
             [{"layers": [1], "vector": vector(7), "factor": 1.0}],
             [{"layers": [0], "vector": vector(9), "factor": 2.0, "tokens": "prompt"}],
             [{"layers": [0, 1], "vector": vector(10), "factor": 1.0, "tokens": "generated"}]]
    prompts = [PROMPT, "One two three four", "Hello", "Le chat est noir"]

    def send(index: int):
        return client.complete(prompts[index], max_tokens=4, return_token_ids=True, steer=specs[index],
                               capture=[{"accessor": "layers_output", "layers": [2], "tokens": "all"}])

    with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
        results = list(pool.map(send, range(len(specs))))
    for index, (spec, result) in enumerate(zip(specs, results)):
        prompt_ids = tokenizer(prompts[index])["input_ids"]
        token_ids = prompt_ids + result.response["choices"][0]["token_ids"][:-1]
        prompt_rows = torch.arange(len(token_ids)) < len(prompt_ids)
        steer: dict[int, torch.Tensor] = {}
        for entry in spec:
            rows = {"all": torch.ones_like(prompt_rows), "prompt": prompt_rows, "generated": ~prompt_rows}[entry.get("tokens", "all")]
            for layer in entry["layers"]:
                addend = rows[:, None] * entry["factor"] * torch.tensor(entry["vector"])
                steer[layer] = steer.get(layer, 0) + addend
        expected = hf_streams(hf, token_ids, steer, [2])[2]
        assert close(result.captures["layers_output", 2], expected), index
    plain = hf_streams(hf, tokenizer(prompts[3])["input_ids"], {}, [2])[2]
    assert close(results[3].captures["layers_output", 2][: plain.shape[0]], plain), "generated-only steering leaves the prompt"


def test_streaming_gives_the_same_text_and_captures(client):
    spec = {"steer": [{"layers": [1], "vector": vector(7, scale=0.5)}],
            "capture": [{"accessor": "mlps_output", "layers": [2], "tokens": "all"}]}
    whole = client.complete(PROMPT, max_tokens=4, **spec)
    pieces = list(client.stream(PROMPT, max_tokens=4, **spec))
    captures = pieces.pop()
    assert whole.text and "".join(pieces) == whole.text
    assert close(captures["mlps_output", 2], whole.captures["mlps_output", 2])


def test_requests_without_interventions_are_plain_vllm(client):
    plain = client.complete(PROMPT, max_tokens=3)
    assert plain.captures == {} and "nnterp" not in plain.response
    assert plain.text == client.complete(PROMPT, max_tokens=3, capture=[{"accessor": "layers_input", "layers": [0]}]).text


def test_the_openai_package_sends_interventions_as_extra_body(server):
    openai = pytest.importorskip("openai")
    url, path = server
    response = openai.OpenAI(base_url=url + "/v1", api_key=KEY).completions.create(
        model=path, prompt=PROMPT, max_tokens=2, temperature=0,
        extra_body={"nnterp": {"capture": [{"accessor": "layers_output", "layers": [0]}]}})
    captures = response.model_extra["nnterp"]["captures"]
    assert captures["shapes"] == {"layers_output.0": [len(AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"]), 128]}


def test_a_large_capture_comes_under_a_handle_fetched_once(client, server):
    result = client.complete(PROMPT, max_tokens=40, ignore_eos=True,
                             capture=[{"accessor": name, "layers": [0, 1, 2], "tokens": "all"}
                                      for name in ("layers_output", "mlps_output")])
    assert result.captures["layers_output", 2].shape[0] > 40  # over the 64 KiB inline cap: fetched by handle
    described = result.response["nnterp"]["captures"]
    assert "handle" in described and "data" not in described
    with pytest.raises(ServerError, match="no such capture"):
        client._request("GET", described["url"])  # fetched once


BAD = [
    ({"capture": [{"accessor": "layers_outputs", "layers": [0]}]}, "nnterp.capture[0].accessor", "use one of"),
    ({"capture": [{"accessor": "layers_output", "layers": [3]}]}, "nnterp.capture[0].layers", "out of range"),
    ({"steer": [{"layers": [0], "vector": [1.0, 2.0]}]}, "nnterp.steer[0].vector", "hidden size is 128"),
    ({"steer": [{"layers": [0], "vector": [math.nan] * 128}]}, "nnterp.steer[0].vector", "NaN or infinite"),
    ({"steer": [{"layers": [0], "vector": [math.inf] * 128}]}, "nnterp.steer[0].vector", "NaN or infinite"),
    ({"steer": [{"layers": [0], "vector": {"token": " Paris Rome London"}}]}, "nnterp.steer[0].vector.token", "tokens"),
    ({"ablate": [{"accessor": "layers_input", "layers": [0]}]}, "nnterp.ablate[0].accessor", "use one of"),
    ({"capture": [{"accessor": "layers_output", "layers": [0, 1, 2], "tokens": "all"}]}, "nnterp.capture", "over this server's cap"),
    ({"steering": []}, "nnterp.steering", "unknown field"),
]


@pytest.mark.parametrize("spec, param, message", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_requests_get_a_4xx_naming_the_field(client, spec, param, message):
    body = {"model": client.model, "prompt": PROMPT, "max_tokens": 200 if "cap" in message else 2, "nnterp": spec}
    with pytest.raises(ServerError) as caught:
        client._request("POST", "/v1/completions", body)
    assert caught.value.status == 400 and caught.value.param == param and message in caught.value.message
    assert client.complete(PROMPT, max_tokens=1).text  # the server goes on serving


def raw(url: str, body: bytes, headers: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/v1/completions", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_malformed_json_and_the_api_key(server, client):
    url, _ = server
    auth = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    status, reply = raw(url, b'{"model": "x", "prompt": "hi", "nnterp": {', auth)
    assert 400 <= status < 500 and "error" in reply
    good = json.dumps({"model": client.model, "prompt": PROMPT, "max_tokens": 1,
                       "nnterp": {"capture": [{"accessor": "layers_output", "layers": [0]}]}}).encode()
    for headers in ({"Content-Type": "application/json"}, {**auth, "Authorization": "Bearer wrong"}):
        status, reply = raw(url, good, headers)
        assert status == 401, reply
        with pytest.raises(ServerError, match="HTTP 401"):
            Client(url, api_key=headers.get("Authorization", " ").split(" ")[1] or None, model=client.model).describe()
    assert raw(url, good, auth)[0] == 200


def test_the_server_answers_after_an_engine_side_failure(server, client):
    """A vLLM module fails in the forward pass that runs a served request's interventions: that request gets a
    500 saying so, and the next one is served with the right values."""
    url, _ = server
    spec = {"steer": [{"layers": [0], "vector": vector(5), "factor": 2.0}],
            "capture": [{"accessor": "layers_output", "layers": [2]}]}
    before = client.complete(PROMPT, max_tokens=2, **spec)
    armed = urllib.request.Request(url + "/collective_rpc", data=json.dumps({"method": "fail_next_forward"}).encode(),
                                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(armed, timeout=60) as reply:
        assert reply.status == 200
    with pytest.raises(ServerError, match="injected failure of a vLLM module.*forward pass raised") as caught:
        client.complete(PROMPT, max_tokens=2, **spec)
    assert caught.value.status == 500
    after = client.complete(PROMPT, max_tokens=2, **spec)
    assert after.text == before.text and torch.equal(after.captures["layers_output", 2], before.captures["layers_output", 2])


def hf_with_hooks(hf, token_ids: list[int], hooks: dict) -> dict[int, torch.Tensor]:
    """Every layer's output of the raw HF model with forward hooks ``{module: hook}`` installed."""
    model, _ = hf
    return outputs_with_hooks(model, token_ids, hooks, dict(enumerate(model.model.layers)))


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_equals_a_hook_on_the_hf_model(client, hf, mode):
    model, tokenizer = hf
    ids = tokenizer(PROMPT)["input_ids"]
    result = client.complete(PROMPT, max_tokens=1, ablate=[{"accessor": "mlps_output", "layers": [1], "mode": mode}],
                             capture=[{"accessor": "layers_output", "layers": [2]}])

    def ablate(module, args, output):
        return torch.zeros_like(output) if mode == "zero" else output.mean(dim=1, keepdim=True).expand_as(output)

    expected = hf_with_hooks(hf, ids, {model.model.layers[1].mlp: ablate})[2]
    assert close(result.captures["layers_output", 2], expected)
    assert not close(result.captures["layers_output", 2], hf_with_hooks(hf, ids, {})[2])


def test_skipped_layers_pass_their_first_input_on(client, hf):
    model, tokenizer = hf
    ids = tokenizer(PROMPT)["input_ids"]
    result = client.complete(PROMPT, max_tokens=1, skip_layers=[[1, 2]],
                             capture=[{"accessor": "layers_output", "layers": [0, 2]}])
    entering = {}

    def keep_input(module, args, output):
        return (entering["value"], *output[1:]) if isinstance(output, tuple) else entering["value"]

    hooks = {model.model.layers[1]: keep_input, model.model.layers[2]: keep_input}
    pre = model.model.layers[1].register_forward_pre_hook(lambda m, a: entering.__setitem__("value", a[0]))
    try:
        expected = hf_with_hooks(hf, ids, hooks)
    finally:
        pre.remove()
    assert close(result.captures["layers_output", 2], expected[2])
    assert close(result.captures["layers_output", 2], result.captures["layers_output", 0])
