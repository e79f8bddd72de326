"""The gRPC face of the service (``protos/privtune/v1/inference.proto``).

Status codes: an exhausted budget is RESOURCE_EXHAUSTED (the message says spent/total and how to get
a new budget; trailing metadata ``privtune-error: budget-exhausted`` tells it apart from gRPC's own
RESOURCE_EXHAUSTED for oversized messages), a request the user can fix (an oversized prompt included)
is INVALID_ARGUMENT, a replica or budget keeper that is restarting is UNAVAILABLE, anything else
INTERNAL. No status carries Ray's text (actor ids, PIDs, node addresses).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
from ray.exceptions import RayError, RayTaskError

from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.inference_api import (
    BUDGET_EXHAUSTED,
    ERROR_KIND,
    MAX_PROMPT_TEXT_BYTES,
    MAX_PROMPT_TOKENS,
    RESTARTING,
)
from privtune.common.proto_gen.privtune.v1 import inference_pb2 as pb
from privtune.common.proto_gen.privtune.v1 import inference_pb2_grpc as pb_grpc
from privtune.common.text_tokenizer import TextTokenizer
from privtune.server.inference.service import PMixedService, ServiceUnavailableError

REPLACEMENT = "\ufffd"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # gRPC itself answers larger messages, with RESOURCE_EXHAUSTED


class IncrementalDecoder:
    """Text of each new token, as the difference of decoding the whole continuation so far.

    Byte-level and BPE tokens may split a character; text ending in U+FFFD is held back until
    the character completes, so the streamed pieces concatenate to the decoded continuation.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT) or not text.startswith(self.sent):
            return ""
        piece, self.sent = text[len(self.sent) :], text
        return piece


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, service: PMixedService, tokenizer: TextTokenizer) -> None:
        self.service = service
        self.tokenizer = tokenizer

    def _prompt(self, prompt: pb.Prompt) -> list[int]:
        check_prompt_size(prompt)
        kind = prompt.WhichOneof("kind")
        ids = list(prompt.token_ids.ids) if kind == "token_ids" else self.tokenizer.encode(prompt.text) if kind else []
        return ids or [self.tokenizer.bos_token_id]

    def NextToken(self, request: pb.NextTokenRequest, context: grpc.ServicerContext) -> pb.Token:
        with _status(context):
            release = self.service.next_token(self._prompt(request.prompt))
            return pb.Token(
                id=release.token,
                text=self.tokenizer.decode([release.token]),
                queries_remaining=release.queries_remaining,
            )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.Token]:
        with _status(context):
            eos = self.tokenizer.eos_token_id if request.stop_at_eos else None
            decoder = IncrementalDecoder(self.tokenizer)
            for release in self.service.generate(self._prompt(request.prompt), request.max_new_tokens, eos):
                if not context.is_active():
                    return
                yield pb.Token(
                    id=release.token, text=decoder.push(release.token), queries_remaining=release.queries_remaining
                )

    def BudgetStatus(self, request: pb.BudgetStatusRequest, context: grpc.ServicerContext) -> pb.BudgetStatusResponse:
        with _status(context):
            status = self.service.budget_status()
            if status.get("projection") == "box":
                status = {**status, "box_lower": status["lower"], "box_upper": status["upper"]}
            fields = pb.BudgetStatusResponse.DESCRIPTOR.fields_by_name
            return pb.BudgetStatusResponse(**{f: status[f] for f in fields if f in status})  # no beta for the box

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        try:
            health = self.service.health()
        except Exception:  # a dead or hung service is exactly what Health reports
            return pb.HealthResponse(status=pb.HealthResponse.NOT_SERVING)
        serving = pb.HealthResponse.SERVING if health["replicas"] else pb.HealthResponse.NOT_SERVING
        return pb.HealthResponse(status=serving, **health)


def check_prompt_size(prompt: pb.Prompt) -> None:
    """Refuse prompts larger than any model here can read, before tokenising them."""
    if prompt.WhichOneof("kind") == "text" and len(prompt.text.encode()) > MAX_PROMPT_TEXT_BYTES:
        raise PrivtuneError(
            f"the prompt is {len(prompt.text.encode())} bytes; the service accepts at most {MAX_PROMPT_TEXT_BYTES} "
            "bytes of text: shorten it"
        )
    if prompt.WhichOneof("kind") == "token_ids" and len(prompt.token_ids.ids) > MAX_PROMPT_TOKENS:
        raise PrivtuneError(
            f"the prompt has {len(prompt.token_ids.ids)} token ids; the service accepts at most {MAX_PROMPT_TOKENS}: "
            "shorten it"
        )


class _status:
    """Map exceptions to gRPC status codes (a context manager usable inside generators)."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, _tb) -> None:
        if error is None or isinstance(error, (GeneratorExit, grpc.RpcError)):
            return
        error = _cause(error)
        if isinstance(error, BudgetExceededError):
            self.context.set_trailing_metadata(((ERROR_KIND, BUDGET_EXHAUSTED),))
            self.context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
        if isinstance(error, ServiceUnavailableError):
            self.context.set_trailing_metadata(((ERROR_KIND, RESTARTING),))
            self.context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        if isinstance(error, PrivtuneError):
            self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if isinstance(error, RayError):
            self.context.abort(grpc.StatusCode.INTERNAL, "the service failed internally; its log has the details")
        self.context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def _cause(error: BaseException) -> BaseException:
    """The exception a Ray actor raised, without Ray's wrapping (its str is a whole traceback)."""
    while isinstance(error, RayTaskError) and getattr(error, "cause", None) is not None:
        error = error.cause
    return error


def start_server(
    service: PMixedService,
    tokenizer: TextTokenizer,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    max_workers: int = 16,
) -> tuple[grpc.Server, int]:
    """Start serving on ``host:port`` (port 0 picks a free one), with TLS when ``credentials`` are
    given; returns the server and its port."""
    # Room well past the largest prompt we accept, so that most oversized ones get our size check's answer.
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=options)
    pb_grpc.add_InferenceServicer_to_server(InferenceServicer(service, tokenizer), server)
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise PrivtuneError(f"cannot listen on {host}:{port}; the port is taken or the address is not local")
    server.start()
    return server, bound
