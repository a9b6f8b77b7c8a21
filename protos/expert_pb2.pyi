from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("layer", "hidden", "expert_ids", "weights")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    hidden: Tensor
    expert_ids: Tensor
    weights: Tensor
    def __init__(self, layer: _Optional[int] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ..., expert_ids: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DispatchResponse(_message.Message):
    __slots__ = ("output",)
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostedExpert(_message.Message):
    __slots__ = ("layer", "expert", "rows_served")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    rows_served: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., rows_served: _Optional[int] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("host_id", "experts", "dtype", "device", "expert_bytes", "hidden_size")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    experts: _containers.RepeatedCompositeFieldContainer[HostedExpert]
    dtype: str
    device: str
    expert_bytes: int
    hidden_size: int
    def __init__(self, host_id: _Optional[str] = ..., experts: _Optional[_Iterable[_Union[HostedExpert, _Mapping]]] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., expert_bytes: _Optional[int] = ..., hidden_size: _Optional[int] = ...) -> None: ...
