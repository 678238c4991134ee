"""A small client of ``nnterp serve``: completions whose standardized interventions and captures are plain
arguments and tensors.

::

    from nnterp.client import Client

    client = Client("http://127.0.0.1:8000", api_key=None)
    result = client.complete("The capital of France is", max_tokens=8,
                             steer=[{"layers": [10, 11], "vector": {"token": " London"}, "factor": 4.0}],
                             capture=[{"accessor": "layers_output", "layers": [5], "tokens": "prompt"}])
    result.text, result.captures["layers_output", 5]     # [prompt tokens, hidden] tensor

Any OpenAI client works as well: send the same object as the request's ``nnterp`` field (``extra_body={"nnterp":
...}`` with the ``openai`` package) and read ``response.nnterp`` (docs/serving.md). Standard library only, plus
torch and safetensors to decode captures.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Iterator


class ServerError(RuntimeError):
    """The server refused or failed a request: ``status`` and its message."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}" + (f" (field {param})" if param else ""))
        self.status, self.message, self.param = status, message, param


class Captures(dict):
    """Captured streams by name: ``captures["layers_output", 5]`` or ``captures["layers_output.5"]``, each
    ``[tokens, hidden]``."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            accessor, layer = key
            key = f"{accessor}.{layer}"
        return super().__getitem__(key)


@dataclass
class Completion:
    """A served completion: its text, the full response, and the captures."""

    text: str
    response: dict
    captures: Captures = field(default_factory=Captures)


class Client:
    """Requests to one ``nnterp serve`` server (``model`` defaults to the one it serves)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            self._model = self._request("GET", "/v1/models")["data"][0]["id"]
        return self._model

    def describe(self) -> dict:
        """The served model's layers, hidden size and accessors."""
        return self._request("GET", "/nnterp/model")

    def complete(self, prompt: str | list[int], *, steer: list | None = None, capture: list | None = None,
                 ablate: list | None = None, skip_layers: list | None = None, **params: Any) -> Completion:
        """``/v1/completions`` with the interventions given (greedy unless ``temperature`` says otherwise)."""
        body = {"model": self.model, "prompt": prompt, "temperature": 0.0, **params}
        return self._complete("/v1/completions", body, _spec(steer, capture, ablate, skip_layers), chat=False)

    def chat(self, messages: list[dict], *, steer: list | None = None, capture: list | None = None,
             ablate: list | None = None, skip_layers: list | None = None, **params: Any) -> Completion:
        """``/v1/chat/completions`` with the interventions given."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0, **params}
        return self._complete("/v1/chat/completions", body, _spec(steer, capture, ablate, skip_layers), chat=True)

    def stream(self, prompt: str | list[int], *, steer: list | None = None, capture: list | None = None,
               ablate: list | None = None, skip_layers: list | None = None, **params: Any) -> Iterator[str | Captures]:
        """The completion's text as the server streams it, then (last) the captures."""
        body = {"model": self.model, "prompt": prompt, "temperature": 0.0, "stream": True, **params}
        spec = _spec(steer, capture, ablate, skip_layers)
        if spec:
            body["nnterp"] = spec
        with self._open("POST", "/v1/completions", body) as response:
            for line in response:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "nnterp" in event:
                    yield self._captures(event["nnterp"])
                for choice in event.get("choices", []):
                    if choice.get("text"):
                        yield choice["text"]

    def _complete(self, path: str, body: dict, spec: dict, chat: bool) -> Completion:
        if spec:
            body["nnterp"] = spec
        response = self._request("POST", path, body)
        choice = response["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return Completion(text or "", response, self._captures(response.get("nnterp") or {}))

    def _captures(self, extra: dict) -> Captures:
        if extra.get("error"):
            raise ServerError(500, extra["error"], "nnterp")
        described = extra.get("captures")
        if not described:
            return Captures()
        from safetensors.torch import load

        if "data" in described:
            payload = base64.b64decode(described["data"])
        else:
            with self._open("GET", described["url"]) as response:
                payload = response.read()
        return Captures(load(payload))

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as response:
            return json.loads(response.read())

    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            raise _server_error(error) from None


def _spec(steer, capture, ablate, skip_layers) -> dict:
    given = {"steer": steer, "capture": capture, "ablate": ablate, "skip_layers": skip_layers}
    return {name: value for name, value in given.items() if value}


def _server_error(error: urllib.error.HTTPError) -> ServerError:
    try:
        detail = json.loads(error.read())["error"]
        message = detail["message"] if isinstance(detail, dict) else str(detail)
        param = detail.get("param") if isinstance(detail, dict) else None
    except Exception:  # not a JSON error body
        message, param = str(error), None
    return ServerError(error.code, message, param)
