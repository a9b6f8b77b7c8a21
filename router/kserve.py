"""KServe Open Inference Protocol v2 (inference.GRPCInferenceService) over the moe.v1 request pipeline.

An unmodified Triton client (`tritonclient.grpc`) talks to it as to a Triton LLM model (vLLM or
TensorRT-LLM backend). One model is served, under the name given to `KServeService`, version "1".

Inputs (each shape [1] or [1, 1], i.e. one element; all but `text_input` optional):

    text_input               BYTES          the prompt, UTF-8 plain text (the BOS token is added)
    stream                   BOOL           ModelStreamInfer: one response per text delta; default false
    exclude_input_in_output  BOOL           default TRUE here (vLLM's default is false): the output is only the
                                            completion; false prepends the prompt text (as the first delta)
    sampling_parameters      BYTES          a JSON object of sampling fields (below); numbers may be strings
    max_tokens               INT32/INT64    per-field inputs, overriding sampling_parameters
    temperature, top_p       FP32/FP64
    top_k                    INT32/INT64
    seed                     INT64/UINT64
    ignore_eos               BOOL

Sampling fields, in `sampling_parameters`, per-field inputs or request `parameters` (priority in that
order, highest first): max_tokens (-> max_new_tokens), temperature, top_p, top_k (-1 or 0: no
truncation, as vLLM), seed, stop (a string or a list of strings), stop_token_ids, ignore_eos. The
request parameter "timeout" (microseconds) bounds the request as a gRPC deadline would; Triton's other
reserved parameters are ignored. Unknown inputs, fields or parameters are refused, never ignored.

Output `text_output` (BYTES, shape [1]), sent as raw_output_contents. Streamed responses carry the
parameter `triton_final_response` (false, then true on the last one, whose text is whatever was held
back, often empty); final responses also carry `finish_reason` ("length", "stop", "cancelled"),
`prompt_tokens` and `completion_tokens`. ModelInfer ignores `stream` and answers once, with the whole text.

Errors: ModelInfer answers with the status moe.v1 would (INVALID_ARGUMENT for a malformed tensor or
value, NOT_FOUND for another model, OUT_OF_RANGE, RESOURCE_EXHAUSTED, ...). ModelStreamInfer puts
"request '<id>': <STATUS>: <what>" in the stream's error_message and keeps the stream open; requests on
one stream run concurrently and each response carries its request's id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NoReturn

import grpc

from protos import kserve_pb2, kserve_pb2_grpc, router_pb2
from router.api import GenerationService, RequestRejected

log = logging.getLogger(__name__)

SERVICE_NAME = "inference.GRPCInferenceService"
MODEL_VERSION = "1"
TEXT_OUTPUT = "text_output"
FINAL_PARAMETER = "triton_final_response"

# Accepted datatypes of each input; the first is the one ModelMetadata advertises.
INPUT_DATATYPES: dict[str, tuple[str, ...]] = {
    "text_input": ("BYTES",),
    "stream": ("BOOL",),
    "exclude_input_in_output": ("BOOL",),
    "sampling_parameters": ("BYTES",),
    "max_tokens": ("INT32", "INT64", "UINT32", "UINT64"),
    "temperature": ("FP32", "FP64"),
    "top_p": ("FP32", "FP64"),
    "top_k": ("INT32", "INT64"),
    "seed": ("INT64", "UINT64", "INT32", "UINT32"),
    "ignore_eos": ("BOOL",),
}
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos")
# Parameters tritonclient and Triton reserve for themselves (plus any "triton_" prefix): not sampling fields.
RESERVED_PARAMETERS = frozenset({"sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers",
                                 "binary_data_output"})
FINISH_REASON_NAMES = {router_pb2.FINISH_REASON_LENGTH: "length", router_pb2.FINISH_REASON_STOP: "stop",
                       router_pb2.FINISH_REASON_CANCELLED: "cancelled"}

# datatype -> (struct code of one raw little-endian element, InferTensorContents field)
_NUMERIC: dict[str, tuple[str, str]] = {
    "BOOL": ("?", "bool_contents"), "INT32": ("i", "int_contents"), "INT64": ("q", "int64_contents"),
    "UINT32": ("I", "uint_contents"), "UINT64": ("Q", "uint64_contents"), "FP32": ("f", "fp32_contents"),
    "FP64": ("d", "fp64_contents"),
}
_UINT32_MAX, _UINT64_MAX = 2**32 - 1, 2**64 - 1
_FLOAT32_MAX = 3.4028234663852886e38


class MalformedRequest(RequestRejected):
    """A tensor, parameter or field the KServe layer refuses before the pipeline sees it: INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        super().__init__(grpc.StatusCode.INVALID_ARGUMENT, message)


@dataclass
class KServeCall:
    """A decoded ModelInferRequest: the moe.v1 request, and how to answer it."""

    generate: router_pb2.GenerateRequest
    prompt_text: str
    is_stream: bool = False
    is_input_excluded: bool = True
    timeout_s: float | None = None  # from the "timeout" parameter; None: only the gRPC deadline


class KServeService(kserve_pb2_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService for one model, over GenerationService.run."""

    def __init__(self, generation: GenerationService, model_name: str, is_ready: Callable[[], bool]) -> None:
        if not model_name:
            raise ValueError("model_name is empty: give the name clients will ask for (e.g. the model directory's)")
        self.generation, self.model_name, self.is_ready = generation, model_name, is_ready

    async def ServerLive(self, request: kserve_pb2.ServerLiveRequest, context: Any
                         ) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kserve_pb2.ServerReadyRequest, context: Any
                          ) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=await self._ready())

    async def ModelReady(self, request: kserve_pb2.ModelReadyRequest, context: Any) -> kserve_pb2.ModelReadyResponse:
        is_ours = request.name == self.model_name and request.version in ("", MODEL_VERSION)
        return kserve_pb2.ModelReadyResponse(ready=is_ours and await self._ready())

    async def ServerMetadata(self, request: kserve_pb2.ServerMetadataRequest, context: Any
                             ) -> kserve_pb2.ServerMetadataResponse:
        return kserve_pb2.ServerMetadataResponse(name="moe-cluster", version=_version(), extensions=["parameters"])

    async def ModelMetadata(self, request: kserve_pb2.ModelMetadataRequest, context: Any
                            ) -> kserve_pb2.ModelMetadataResponse:
        try:
            self._check_model(request.name, request.version)
        except RequestRejected as err:
            await _abort(context, err)
        tensor = kserve_pb2.ModelMetadataResponse.TensorMetadata
        return kserve_pb2.ModelMetadataResponse(
            name=self.model_name, versions=[MODEL_VERSION], platform="moe-cluster",
            inputs=[tensor(name=name, datatype=types[0], shape=[1]) for name, types in INPUT_DATATYPES.items()],
            outputs=[tensor(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])])

    async def ModelInfer(self, request: kserve_pb2.ModelInferRequest, context: Any) -> kserve_pb2.ModelInferResponse:
        try:
            call = self.decode(request)
            text, last = await self._whole(call, _time_remaining(context, call))
        except RequestRejected as err:
            await _abort(context, err)
        return self._response(request.id, text, final=None, last=last)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kserve_pb2.ModelInferRequest], context: Any
                               ) -> AsyncIterator[kserve_pb2.ModelStreamInferResponse]:
        # Requests are read while earlier ones still generate; each runs in its own task and the
        # responses of all of them are interleaved through one queue. None: every request is answered.
        responses: asyncio.Queue[kserve_pb2.ModelStreamInferResponse | None] = asyncio.Queue()
        reader = asyncio.create_task(self._read_stream(request_iterator, context, responses))
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader  # a failure of the request stream itself ends the call with its status
        finally:
            reader.cancel()

    def decode(self, request: kserve_pb2.ModelInferRequest) -> KServeCall:
        """A ModelInferRequest -> the moe.v1 request and answer options; MalformedRequest (or NOT_FOUND) says what
        is wrong."""
        self._check_model(request.model_name, request.model_version)
        for output in request.outputs:
            if output.name != TEXT_OUTPUT:
                raise MalformedRequest(f"requested output {output.name!r} does not exist: the only output is "
                                       f"{TEXT_OUTPUT!r}")
        values = _input_values(request)
        if "text_input" not in values:
            raise MalformedRequest("input 'text_input' (BYTES, shape [1]) is missing: it holds the prompt")
        try:
            prompt = _one(values, "text_input").decode("utf-8")
        except UnicodeDecodeError as err:
            raise MalformedRequest(f"input 'text_input' is not UTF-8 text: {err}") from None
        sampling = _parameter_sampling(request.parameters)
        if "sampling_parameters" in values:
            sampling.update(_json_sampling(_one(values, "sampling_parameters")))
        sampling.update({name: _one(values, name) for name in SAMPLING_FIELDS if name in values})
        call = KServeCall(router_pb2.GenerateRequest(text=prompt, request_id=_scheduler_id(request.id)), prompt)
        call.is_stream = bool(_one(values, "stream")) if "stream" in values else False
        if "exclude_input_in_output" in values:
            call.is_input_excluded = bool(_one(values, "exclude_input_in_output"))
        call.timeout_s = _timeout_s(request.parameters)
        _apply_sampling(call.generate, sampling)
        return call

    async def _ready(self) -> bool:
        # is_ready may ask remote hosts (cluster backend): keep it off the event loop.
        return await asyncio.get_running_loop().run_in_executor(None, self.is_ready)

    def _check_model(self, name: str, version: str) -> None:
        if name != self.model_name:
            raise RequestRejected(grpc.StatusCode.NOT_FOUND, f"model {name!r} is not served here: this server "
                                  f"serves {self.model_name!r}")
        if version not in ("", MODEL_VERSION):
            raise RequestRejected(grpc.StatusCode.NOT_FOUND, f"model {name!r} has no version {version!r}: the only "
                                  f"version is {MODEL_VERSION!r} (or leave it empty)")

    async def _whole(self, call: KServeCall, time_remaining: float | None
                     ) -> tuple[str, router_pb2.GenerateResponse]:
        """Run a request to the end -> its whole output text and the pipeline's final message."""
        texts = [] if call.is_input_excluded else [call.prompt_text]
        last = router_pb2.GenerateResponse()
        async for part in self.generation.run(call.generate, time_remaining):
            texts.append(part.text)
            last = part
        return "".join(texts), last

    async def _read_stream(self, requests: AsyncIterator[kserve_pb2.ModelInferRequest], context: Any,
                           responses: asyncio.Queue[kserve_pb2.ModelStreamInferResponse | None]) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for request in requests:
                task = asyncio.create_task(self._answer_in_stream(request, context, responses))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:  # the client has sent its last request: finish the outstanding ones
                await asyncio.wait(set(tasks))
        finally:
            for task in tasks:  # the call ended early (cancelled, deadline): free their sequences
                task.cancel()
            responses.put_nowait(None)

    async def _answer_in_stream(self, request: kserve_pb2.ModelInferRequest, context: Any,
                                responses: asyncio.Queue[kserve_pb2.ModelStreamInferResponse | None]) -> None:
        try:
            call = self.decode(request)
            time_remaining = _time_remaining(context, call)
            if not call.is_stream:
                text, last = await self._whole(call, time_remaining)
                responses.put_nowait(self._streamed(request.id, text, final=True, last=last))
                return
            if not call.is_input_excluded:
                responses.put_nowait(self._streamed(request.id, call.prompt_text, final=False))
            async for part in self.generation.run(call.generate, time_remaining):
                if part.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED:
                    responses.put_nowait(self._streamed(request.id, part.text, final=True, last=part))
                elif part.text:  # a token that completes no character yet has nothing to send
                    responses.put_nowait(self._streamed(request.id, part.text, final=False))
        except RequestRejected as err:
            responses.put_nowait(self._stream_error(request, err))
        except Exception as err:
            # One request's bug must not end the other requests on the stream.
            log.exception("KServe stream request id=%r failed", request.id)
            responses.put_nowait(self._stream_error(request, RequestRejected(grpc.StatusCode.INTERNAL, repr(err))))

    def _streamed(self, request_id: str, text: str, final: bool,
                  last: router_pb2.GenerateResponse | None = None) -> kserve_pb2.ModelStreamInferResponse:
        return kserve_pb2.ModelStreamInferResponse(infer_response=self._response(request_id, text, final, last))

    def _stream_error(self, request: kserve_pb2.ModelInferRequest, err: RequestRejected
                      ) -> kserve_pb2.ModelStreamInferResponse:
        # tritonclient hands the callback only error_message, so the id goes into the text as well.
        retry = f" (retry after {err.retry_after_s:.1f} s)" if err.retry_after_s is not None else ""
        return kserve_pb2.ModelStreamInferResponse(
            error_message=f"request {request.id!r}: {err.code.name}: {err.message}{retry}",
            infer_response=kserve_pb2.ModelInferResponse(model_name=request.model_name, id=request.id))

    def _response(self, request_id: str, text: str, final: bool | None,
                  last: router_pb2.GenerateResponse | None = None) -> kserve_pb2.ModelInferResponse:
        """One text_output response; `final` sets triton_final_response (None: unary, not set); `last`, the
        pipeline's final message, adds finish_reason and token counts."""
        response = kserve_pb2.ModelInferResponse(model_name=self.model_name, model_version=MODEL_VERSION, id=request_id)
        response.outputs.add(name=TEXT_OUTPUT, datatype="BYTES", shape=[1])
        response.raw_output_contents.append(encode_bytes_elements([text.encode("utf-8")]))
        if final is not None:
            response.parameters[FINAL_PARAMETER].bool_param = final
        if last is not None and last.finish_reason != router_pb2.FINISH_REASON_UNSPECIFIED:
            response.parameters["finish_reason"].string_param = FINISH_REASON_NAMES[last.finish_reason]
            response.parameters["prompt_tokens"].int64_param = last.usage.prompt_tokens
            response.parameters["completion_tokens"].int64_param = last.usage.completion_tokens
        return response


def add_to_server(service: KServeService) -> tuple[Callable[[grpc.aio.Server], None], str]:
    """The (adder, service name) pair `router.api.build_server(extra=...)` takes."""
    return (lambda server: kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)), SERVICE_NAME


def encode_bytes_elements(elements: list[bytes]) -> bytes:
    """BYTES tensor elements -> KServe raw contents: each a 4-byte little-endian length, then its bytes.

    Example: [b"hi", b""] -> b"\\x02\\x00\\x00\\x00hi\\x00\\x00\\x00\\x00".
    """
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def decode_bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """KServe raw BYTES contents -> the elements; MalformedRequest if a length runs past the end."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise MalformedRequest(f"input {name!r}: raw BYTES contents end inside a 4-byte length prefix at "
                                   f"byte {offset}")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise MalformedRequest(f"input {name!r}: a BYTES element of {size} bytes at byte {offset} runs past the "
                                   f"{len(raw)} bytes given")
        elements.append(raw[offset:offset + size])
        offset += size
    return elements


def _input_values(request: kserve_pb2.ModelInferRequest) -> dict[str, list[Any]]:
    """name -> the elements of each input, checked against INPUT_DATATYPES and the one-element shape."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise MalformedRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs: give "
                               "one per input, in order, or none")
    values: dict[str, list[Any]] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name not in INPUT_DATATYPES:
            raise MalformedRequest(f"unknown input {name!r}: the inputs are {', '.join(INPUT_DATATYPES)}")
        if name in values:
            raise MalformedRequest(f"input {name!r} is given twice")
        allowed = INPUT_DATATYPES[name]
        if tensor.datatype not in allowed:
            raise MalformedRequest(f"input {name!r} has datatype {tensor.datatype!r}; expected {' or '.join(allowed)}")
        shape = list(tensor.shape)
        if shape not in ([1], [1, 1]):
            raise MalformedRequest(f"input {name!r} has shape {shape}; expected [1] or [1, 1] (one element)")
        elements = _elements(tensor, raw[index] if raw else None)
        if len(elements) != 1:
            raise MalformedRequest(f"input {name!r} has shape {shape} but {len(elements)} elements of data")
        values[name] = elements
    return values


def _elements(tensor: kserve_pb2.ModelInferRequest.InferInputTensor, raw: bytes | None) -> list[Any]:
    if tensor.datatype == "BYTES":
        return decode_bytes_elements(raw, tensor.name) if raw is not None else list(tensor.contents.bytes_contents)
    code, contents_field = _NUMERIC[tensor.datatype]
    if raw is None:
        return list(getattr(tensor.contents, contents_field))
    size = struct.calcsize(code)
    if len(raw) % size:
        raise MalformedRequest(f"input {tensor.name!r}: {len(raw)} raw bytes is not a whole number of "
                               f"{tensor.datatype} elements ({size} bytes each)")
    return list(struct.unpack(f"<{len(raw) // size}{code}", raw))


def _one(values: dict[str, list[Any]], name: str) -> Any:
    return values[name][0]


def _parameter_value(parameter: kserve_pb2.InferParameter) -> Any:
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def _parameter_sampling(parameters: Any) -> dict[str, Any]:
    """Sampling fields among the request's parameters; other non-reserved names are refused."""
    sampling = {}
    for name, parameter in parameters.items():
        if name in RESERVED_PARAMETERS or name.startswith("triton_"):
            continue
        if name not in SAMPLING_FIELDS:
            raise MalformedRequest(f"unknown request parameter {name!r}: the sampling parameters are "
                                   f"{', '.join(SAMPLING_FIELDS)}")
        sampling[name] = _parameter_value(parameter)
    return sampling


def _json_sampling(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise MalformedRequest(f"input 'sampling_parameters' is not valid JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise MalformedRequest(f"input 'sampling_parameters' must be a JSON object, not {type(parsed).__name__}")
    unknown = sorted(set(parsed) - set(SAMPLING_FIELDS))
    if unknown:
        raise MalformedRequest(f"sampling_parameters has unsupported fields {unknown}: the supported ones are "
                               f"{', '.join(SAMPLING_FIELDS)}")
    return parsed


def _timeout_s(parameters: Any) -> float | None:
    if "timeout" not in parameters:
        return None
    value = _parameter_value(parameters["timeout"])
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRequest(f"request parameter 'timeout' must be an integer (microseconds), not {value!r}")
    return value / 1e6 if value > 0 else None  # 0: none, as Triton


def _time_remaining(context: Any, call: KServeCall) -> float | None:
    remaining: float | None = context.time_remaining()
    if call.timeout_s is None:
        return remaining
    return call.timeout_s if remaining is None else min(remaining, call.timeout_s)


def _apply_sampling(request: router_pb2.GenerateRequest, sampling: dict[str, Any]) -> None:
    """Checked sampling fields -> the moe.v1 request; value ranges the pipeline checks are left to it."""
    for name, value in sampling.items():
        if value is None:
            continue
        if name == "max_tokens":
            request.max_new_tokens = _integer(name, value, 0, _UINT32_MAX)
        elif name == "temperature":
            request.sampling.temperature = _real(name, value)
        elif name == "top_p":
            request.sampling.top_p = _real(name, value)
        elif name == "top_k":
            top_k = _integer(name, value, -1, _UINT32_MAX)
            if top_k > 0:  # -1 and 0 turn truncation off, as in vLLM
                request.sampling.top_k = top_k
        elif name == "seed":
            request.sampling.seed = _integer(name, value, 0, _UINT64_MAX)
        elif name == "ignore_eos":
            request.ignore_eos = _boolean(name, value)
        elif name == "stop":
            request.stop.extend(_strings(name, value))
        elif name == "stop_token_ids":
            items = value if isinstance(value, list) else [value]
            request.stop_token_ids.extend(_integer(name, item, 0, _UINT32_MAX) for item in items)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, str):  # vLLM's examples send numbers as strings in sampling_parameters
        try:
            value = int(value.strip())
        except ValueError:
            raise MalformedRequest(f"{name}={value!r} is not an integer") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRequest(f"{name}={value!r} is not an integer")
    if not low <= value <= high:
        raise MalformedRequest(f"{name}={value} is out of range: it must be in [{low}, {high}]")
    return value


def _real(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise MalformedRequest(f"{name}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedRequest(f"{name}={value!r} is not a number")
    # The moe.v1 fields are float32: a larger magnitude would silently become infinity there.
    if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > _FLOAT32_MAX:
        raise MalformedRequest(f"{name}={value} is not a finite float32 number")
    return float(value)


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise MalformedRequest(f"{name}={value!r} is not a boolean (true or false)")
    return value


def _strings(name: str, value: Any) -> Iterator[str]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str):
            raise MalformedRequest(f"{name}: {item!r} is not a string; give a string or a list of strings")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which JSON's \u escapes allow
            raise MalformedRequest(f"{name}: {item!r} is not valid Unicode text") from None
        yield item


def _scheduler_id(client_id: str) -> str:
    # The scheduler keys sequences by id, and KServe clients reuse ids freely (often ""): make each unique,
    # keeping the client's id in front so the request log still shows it.
    suffix = uuid.uuid4().hex[:12]
    return f"{client_id}#{suffix}" if client_id else suffix


def _version() -> str:
    try:
        return metadata.version("moe-cluster")
    except metadata.PackageNotFoundError:
        return "unknown"


async def _abort(context: Any, err: RequestRejected) -> NoReturn:
    if err.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after-s", f"{err.retry_after_s:.1f}"),))
    await context.abort(err.code, err.message)
    raise AssertionError("grpc.aio's context.abort returns only by raising")
