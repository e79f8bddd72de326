from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class NextTokenRequest(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_new_tokens", "stop_at_eos")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_EOS_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    max_new_tokens: int
    stop_at_eos: bool
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., stop_at_eos: _Optional[bool] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("id", "text", "queries_remaining")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    QUERIES_REMAINING_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    queries_remaining: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., queries_remaining: _Optional[int] = ...) -> None: ...

class BudgetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BudgetStatusResponse(_message.Message):
    __slots__ = ("epsilon", "delta", "alpha", "queries_total", "queries_spent", "rdp_total", "rdp_spent", "epsilon_spent", "n_members", "q", "beta", "ledger", "exhausted", "projection", "box_lower", "box_upper")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    QUERIES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUERIES_SPENT_FIELD_NUMBER: _ClassVar[int]
    RDP_TOTAL_FIELD_NUMBER: _ClassVar[int]
    RDP_SPENT_FIELD_NUMBER: _ClassVar[int]
    EPSILON_SPENT_FIELD_NUMBER: _ClassVar[int]
    N_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    LEDGER_FIELD_NUMBER: _ClassVar[int]
    EXHAUSTED_FIELD_NUMBER: _ClassVar[int]
    PROJECTION_FIELD_NUMBER: _ClassVar[int]
    BOX_LOWER_FIELD_NUMBER: _ClassVar[int]
    BOX_UPPER_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    alpha: int
    queries_total: int
    queries_spent: int
    rdp_total: float
    rdp_spent: float
    epsilon_spent: float
    n_members: int
    q: float
    beta: float
    ledger: str
    exhausted: bool
    projection: str
    box_lower: float
    box_upper: float
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., alpha: _Optional[int] = ..., queries_total: _Optional[int] = ..., queries_spent: _Optional[int] = ..., rdp_total: _Optional[float] = ..., rdp_spent: _Optional[float] = ..., epsilon_spent: _Optional[float] = ..., n_members: _Optional[int] = ..., q: _Optional[float] = ..., beta: _Optional[float] = ..., ledger: _Optional[str] = ..., exhausted: _Optional[bool] = ..., projection: _Optional[str] = ..., box_lower: _Optional[float] = ..., box_upper: _Optional[float] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "replicas", "n_members", "model", "vocab_size")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[HealthResponse.Status]
        SERVING: _ClassVar[HealthResponse.Status]
        NOT_SERVING: _ClassVar[HealthResponse.Status]
    STATUS_UNSPECIFIED: HealthResponse.Status
    SERVING: HealthResponse.Status
    NOT_SERVING: HealthResponse.Status
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    N_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.Status
    replicas: int
    n_members: int
    model: str
    vocab_size: int
    def __init__(self, status: _Optional[_Union[HealthResponse.Status, str]] = ..., replicas: _Optional[int] = ..., n_members: _Optional[int] = ..., model: _Optional[str] = ..., vocab_size: _Optional[int] = ...) -> None: ...
