"""KServe v2 (inference.GRPCInferenceService) as an unmodified `tritonclient.grpc` sees it.

protobuf refuses two files defining the same symbols in one process, and protos/kserve_pb2 and
tritonclient's service_pb2 both define package `inference`. So neither is imported here: the server is
`moe-cluster serve` in a subprocess (which also checks its wiring in cluster/serve.py), and the Triton
client runs in a second subprocess (`python -m tests.router.test_kserve`, the `__main__` block below)
that plays every scenario once and prints what it saw as JSON. The tests compare that with moe.v1,
called from this process.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from protos import router_pb2, router_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_LOG_LEVEL": "WARNING"}
PROMPTS = ("Mixtral routes each token to two experts.", "Hello there")
MAX_TOKENS = 12
MAX_NEW_TOKENS_CAP = 64
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`moe-cluster serve` on the tiny checkpoint, on a free loopback port -> the port."""
    log = (tmp_path_factory.mktemp("kserve") / "server.log").open("w+")
    argv = [sys.executable, "-m", "cluster.cli", "serve", "--model", str(tiny_checkpoint), "--device", "cpu",
            "--dtype", "float32", "--port", "0", "--metrics-port", "0", "--grace-period", "1",
            "--max-new-tokens-cap", str(MAX_NEW_TOKENS_CAP)]
    proc = subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "moe-cluster: serving <dir> on 127.0.0.1:<port> (metrics ...)"
        if "serving" not in line:
            log.seek(0)
            pytest.fail(f"the server did not start: {line!r}\n{log.read()}")
        yield int(line.split(" on ")[1].split()[0].rsplit(":", 1)[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def generation(server: int) -> Iterator[router_pb2_grpc.GenerationStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server}") as channel:
        yield router_pb2_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def expected(generation: router_pb2_grpc.GenerationStub) -> list[str]:
    """moe.v1 Generate's greedy text of each prompt: what KServe must return too."""
    return [generation.Generate(router_pb2.GenerateRequest(
        text=prompt, max_new_tokens=MAX_TOKENS, sampling=router_pb2.SamplingParameters(temperature=0.0)),
        timeout=DEADLINE_S).text for prompt in PROMPTS]


@pytest.fixture(scope="module")
def seen(server: int, tiny_checkpoint: Path) -> dict[str, Any]:
    """What the Triton client saw in every scenario of `client_session`."""
    model = tiny_checkpoint.name  # the KServe model name is the model directory's name
    config = {"url": f"127.0.0.1:{server}", "model": model}
    done = subprocess.run([sys.executable, "-m", "tests.router.test_kserve"], cwd=REPO, env=ENV,
                          input=json.dumps(config), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_server_and_model_report_live_ready_and_metadata(seen: dict[str, Any], tiny_checkpoint: Path) -> None:
    health = seen["health"]

    assert (health["live"], health["ready"], health["model_ready"]) == (True, True, True)
    assert health["other_model_ready"] is False
    metadata = health["metadata"]
    assert metadata["name"] == tiny_checkpoint.name
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert inputs["text_input"] == ("BYTES", ["1"])
    assert {"stream", "sampling_parameters", "exclude_input_in_output", "max_tokens", "temperature", "top_p",
            "top_k", "seed"} <= set(inputs)
    assert [(t["name"], t["datatype"]) for t in metadata["outputs"]] == [("text_output", "BYTES")]


def test_streamed_text_equals_moe_v1_and_only_the_last_response_is_final(seen: dict[str, Any],
                                                                         expected: list[str]) -> None:
    # Both requests were on one stream at once; g0 set sampling_parameters, g1 per-field tensors.
    streamed = seen["stream"]

    for request_id, text in zip(("g0", "g1"), expected):
        responses = streamed[request_id]
        assert "".join(r["text"] for r in responses) == text
        assert [r["final"] for r in responses] == [False] * (len(responses) - 1) + [True]
        assert all(r["id"] == request_id for r in responses)
        assert len(responses) > 2  # streamed, not answered at once
    assert streamed["g0"][-1]["finish_reason"] == "length"


def test_unary_infer_returns_the_same_text(seen: dict[str, Any], expected: list[str]) -> None:
    unary = seen["unary"]

    assert unary["text"] == expected[0]
    assert unary["id"] == "u0"
    assert unary["with_input"] == PROMPTS[0] + expected[0]


def test_typed_contents_and_batch_shaped_inputs_work_on_the_wire(seen: dict[str, Any], expected: list[str]) -> None:
    # Sent with contents.bytes_contents / fp32_contents / int_contents and shape [1, 1] instead of raw bytes.
    assert seen["typed_contents"] == expected[1]


@pytest.mark.parametrize(("request_id", "says"), [
    ("bad-json", "INVALID_ARGUMENT: input 'sampling_parameters' is not valid JSON"),
    ("bad-datatype", "INVALID_ARGUMENT: input 'text_input' has datatype 'INT32'; expected BYTES"),
    ("bad-shape", "INVALID_ARGUMENT: input 'text_input' has shape [2]; expected [1] or [1, 1]"),
    ("negative-temperature", "INVALID_ARGUMENT: temperature=-1.0 must be >= 0"),
    ("unknown-input", "INVALID_ARGUMENT: unknown input 'prompt'"),
    ("unknown-field", "INVALID_ARGUMENT: sampling_parameters has unsupported fields ['best_of']"),
    ("over-cap", f"OUT_OF_RANGE: max_new_tokens=1000 is over the server's cap of {MAX_NEW_TOKENS_CAP}"),
])
def test_a_bad_request_in_a_stream_is_an_error_message_naming_it(seen: dict[str, Any], request_id: str,
                                                                 says: str) -> None:
    error = seen["stream_errors"][request_id]

    assert error.startswith(f"request {request_id!r}: {says}"), error


def test_the_stream_stays_open_after_errors(seen: dict[str, Any], expected: list[str]) -> None:
    assert seen["stream_errors"]["after"] == expected[0]


@pytest.mark.parametrize(("case", "status", "says"), [
    ("bad-datatype", "INVALID_ARGUMENT", "input 'text_input' has datatype 'INT32'; expected BYTES"),
    ("negative-temperature", "INVALID_ARGUMENT", "temperature=-1.0 must be >= 0"),
    ("missing-text", "INVALID_ARGUMENT", "input 'text_input' (BYTES, shape [1]) is missing"),
    ("other-model", "NOT_FOUND", "model 'nope' is not served here"),
    ("over-cap", "OUT_OF_RANGE", f"max_new_tokens=1000 is over the server's cap of {MAX_NEW_TOKENS_CAP}"),
])
def test_a_bad_unary_request_raises_with_its_status(seen: dict[str, Any], case: str, status: str, says: str) -> None:
    error = seen["unary_errors"][case]

    assert error["status"] == f"StatusCode.{status}"
    assert says in error["message"], error["message"]


# --- the Triton client, run as `python -m tests.router.test_kserve` with its config on stdin ---------------


def client_session(url: str, model: str) -> dict[str, Any]:
    """Every scenario, through tritonclient.grpc as a user would call it -> what came back."""
    import numpy as np
    import tritonclient.grpc as triton

    def tensor(name: str, value: Any, datatype: str) -> Any:
        array = np.array(value if isinstance(value, list) else [value],
                         dtype=object if datatype == "BYTES" else triton_dtype(datatype))
        made = triton.InferInput(name, list(array.shape), datatype)
        made.set_data_from_numpy(array)
        return made

    def triton_dtype(datatype: str) -> Any:
        return {"BOOL": np.bool_, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32}[datatype]

    def sampling(**fields: Any) -> Any:
        return tensor("sampling_parameters", json.dumps(fields).encode(), "BYTES")

    def greedy(prompt: str, stream: bool) -> list[Any]:
        return [tensor("text_input", prompt.encode(), "BYTES"), tensor("stream", stream, "BOOL"),
                sampling(temperature=0, max_tokens=MAX_TOKENS)]

    def text(result: Any) -> str:
        decoded: str = result.as_numpy("text_output")[0].decode()
        return decoded

    client = triton.InferenceServerClient(url)
    seen: dict[str, Any] = {"health": {
        "live": client.is_server_live(), "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model), "other_model_ready": client.is_model_ready("nope"),
        "metadata": client.get_model_metadata(model, as_json=True)}}

    # Two greedy requests at once on one stream; the second with per-field tensors.
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    per_field = [tensor("text_input", PROMPTS[1].encode(), "BYTES"), tensor("stream", True, "BOOL"),
                 tensor("max_tokens", MAX_TOKENS, "INT32"), tensor("temperature", 0.0, "FP32")]
    client.async_stream_infer(model, greedy(PROMPTS[0], stream=True), request_id="g0")
    client.async_stream_infer(model, per_field, request_id="g1")
    streamed: dict[str, list[dict[str, Any]]] = {"g0": [], "g1": []}
    while sum(1 for rs in streamed.values() if rs and rs[-1]["final"]) < 2:
        result, error = answers.get(timeout=DEADLINE_S)
        assert error is None, error
        response = result.get_response()
        finish = response.parameters["finish_reason"].string_param if "finish_reason" in response.parameters else ""
        streamed[response.id].append({"id": response.id, "text": text(result), "finish_reason": finish,
                                      "final": response.parameters["triton_final_response"].bool_param})
    seen["stream"] = streamed

    # Bad requests one after another on the same stream, then a good one.
    bad: dict[str, list[Any]] = {
        "bad-json": [tensor("text_input", b"hi", "BYTES"), tensor("sampling_parameters", b"{not json", "BYTES")],
        "bad-datatype": [tensor("text_input", 7, "INT32")],
        "bad-shape": [tensor("text_input", [b"a", b"b"], "BYTES")],
        "negative-temperature": [tensor("text_input", b"hi", "BYTES"), sampling(temperature=-1)],
        "unknown-input": [tensor("prompt", b"hi", "BYTES")],
        "unknown-field": [tensor("text_input", b"hi", "BYTES"), sampling(best_of=2)],
        "over-cap": [tensor("text_input", b"hi", "BYTES"), tensor("max_tokens", 1000, "INT32")],
    }
    errors: dict[str, str] = {}
    for request_id, inputs in bad.items():
        client.async_stream_infer(model, inputs, request_id=request_id)
        result, error = answers.get(timeout=DEADLINE_S)
        errors[request_id] = error.message() if error is not None else f"no error, got {text(result)!r}"
    client.async_stream_infer(model, greedy(PROMPTS[0], stream=True), request_id="after")
    parts = []
    while True:
        result, error = answers.get(timeout=DEADLINE_S)
        assert error is None, error
        parts.append(text(result))
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    errors["after"] = "".join(parts)
    seen["stream_errors"] = errors
    client.stop_stream()

    unary = client.infer(model, greedy(PROMPTS[0], stream=False), request_id="u0")
    with_input = client.infer(model, [*greedy(PROMPTS[0], stream=False),
                                      tensor("exclude_input_in_output", False, "BOOL")])
    seen["unary"] = {"text": text(unary), "id": unary.get_response().id, "with_input": text(with_input)}

    unary_bad: dict[str, tuple[str, list[Any]]] = {
        "bad-datatype": (model, bad["bad-datatype"]), "negative-temperature": (model, bad["negative-temperature"]),
        "missing-text": (model, [sampling(temperature=0)]), "other-model": ("nope", greedy(PROMPTS[0], False)),
        "over-cap": (model, bad["over-cap"]),
    }
    seen["unary_errors"] = {}
    for case, (name, inputs) in unary_bad.items():
        try:
            client.infer(name, inputs)
            seen["unary_errors"][case] = {"status": "OK", "message": ""}
        except triton.InferenceServerException as err:
            seen["unary_errors"][case] = {"status": err.status(), "message": err.message()}

    seen["typed_contents"] = typed_contents_text(url, model)
    client.close()
    return seen


def typed_contents_text(url: str, model: str) -> str:
    """A greedy request of PROMPTS[1] built from Triton's own messages with typed contents and [1, 1] shapes."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model, id="typed")
    inputs: list[tuple[str, str, Callable[[Any], None]]] = [
        ("text_input", "BYTES", lambda c: c.bytes_contents.append(PROMPTS[1].encode())),
        ("max_tokens", "INT32", lambda c: c.int_contents.append(MAX_TOKENS)),
        ("temperature", "FP32", lambda c: c.fp32_contents.append(0.0)),
    ]
    for name, datatype, fill in inputs:
        added = request.inputs.add(name=name, datatype=datatype, shape=[1, 1])
        fill(added.contents)
    with grpc.insecure_channel(url) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=DEADLINE_S)
    raw = response.raw_output_contents[0]
    size = int.from_bytes(raw[:4], "little")
    return raw[4:4 + size].decode()


if __name__ == "__main__":
    started = time.monotonic()
    config = json.load(sys.stdin)
    json.dump(client_session(config["url"], config["model"]), sys.stdout)
    print(f"client session: {time.monotonic() - started:.1f} s", file=sys.stderr)
