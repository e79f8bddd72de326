"""``privtune query``: ask the PMixED service for privately sampled tokens over gRPC.

With ``--table`` (and the key the table was made with) the prompt is ULT-encoded here and the
returned ids are ULT-decoded here: the table and key never leave the user's machine, and the
server only ever sees and returns token ids.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from privtune.common.errors import BudgetExceededError, PrivtuneError
from privtune.common.inference_api import BUDGET_EXHAUSTED, ERROR_KIND, RESTARTING
from privtune.common.proto_gen.privtune.v1 import inference_pb2 as pb
from privtune.common.proto_gen.privtune.v1 import inference_pb2_grpc as pb_grpc


class ServiceUnavailableError(PrivtuneError):
    """The service answered but a part of it is restarting; asking again in a few seconds may work."""


@dataclass(frozen=True)
class Released:
    id: int
    text: str
    queries_remaining: int


class InferenceClient:
    """A thin typed wrapper over the generated stub; gRPC errors become PrivtuneError subclasses."""

    def __init__(self, address: str, timeout: float = 300.0, tls_ca: bytes | None = None) -> None:
        """``tls_ca``: PEM of the CA that signed the service's certificate (TLS); None for plaintext."""
        self.address = address
        self.timeout = timeout
        self.channel = (
            grpc.insecure_channel(address)
            if tls_ca is None
            else grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=tls_ca))
        )
        self.stub = pb_grpc.InferenceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    @staticmethod
    def _prompt(prompt: str | list[int]) -> pb.Prompt:
        if isinstance(prompt, str):
            return pb.Prompt(text=prompt)
        return pb.Prompt(token_ids=pb.TokenIds(ids=[int(t) for t in prompt]))

    def next_token(self, prompt: str | list[int]) -> Released:
        with _errors(self.address):
            token = self.stub.NextToken(pb.NextTokenRequest(prompt=self._prompt(prompt)), timeout=self.timeout)
        return Released(token.id, token.text, token.queries_remaining)

    def generate(self, prompt: str | list[int], max_new_tokens: int, stop_at_eos: bool = False) -> Iterator[Released]:
        request = pb.GenerateRequest(
            prompt=self._prompt(prompt), max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos
        )
        call = self.stub.Generate(request, timeout=self.timeout)
        try:
            with _errors(self.address):
                for token in call:
                    yield Released(token.id, token.text, token.queries_remaining)
        finally:
            call.cancel()  # a caller that stops early stops the server's spending too

    def budget_status(self) -> dict:
        with _errors(self.address):
            status = self.stub.BudgetStatus(pb.BudgetStatusRequest(), timeout=self.timeout)
        return {field.name: getattr(status, field.name) for field in status.DESCRIPTOR.fields}

    def health(self) -> dict:
        with _errors(self.address):
            health = self.stub.Health(pb.HealthRequest(), timeout=self.timeout)
        return {
            "status": pb.HealthResponse.Status.Name(health.status),
            "replicas": health.replicas,
            "n_members": health.n_members,
            "model": health.model,
            "vocab_size": health.vocab_size,
        }


class _errors:
    def __init__(self, address: str) -> None:
        self.address = address

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, _tb) -> None:
        if not isinstance(error, grpc.RpcError):
            return
        code, details = error.code(), error.details()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            if (ERROR_KIND, BUDGET_EXHAUSTED) in (error.trailing_metadata() or ()):
                raise BudgetExceededError(details) from None
            raise PrivtuneError(f"the service at {self.address} refused the request as too large: {details}") from None
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            raise PrivtuneError(details) from None
        if code == grpc.StatusCode.UNAVAILABLE and (ERROR_KIND, RESTARTING) in (error.trailing_metadata() or ()):
            raise ServiceUnavailableError(f"the service at {self.address} is unavailable: {details}") from None
        if code == grpc.StatusCode.UNAVAILABLE:
            raise PrivtuneError(
                f"cannot reach a privtune service at {self.address} ({details}); start one with "
                "'privtune serve', or, if it serves TLS, give the CA that signed it (--tls-ca)"
            ) from None
        raise PrivtuneError(f"the service at {self.address} failed: {code.name}: {details}") from None


@dataclass(frozen=True)
class Continuation:
    ids: list[int]
    text: str
    queries_remaining: int


def sample(
    client: InferenceClient,
    prompt: str,
    max_new_tokens: int,
    stop_at_eos: bool = False,
    ult=None,
    echo: Callable[[str], None] | None = None,
) -> Continuation:
    """Continue ``prompt``; with a ``UltTokenizer`` the prompt is encoded and the ids decoded here.

    ``echo`` receives the server's text of each token as it arrives (not with ULT, whose patches
    decode only as a whole).
    """
    if max_new_tokens < 1:
        raise PrivtuneError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    request: str | list[int] = ult.encode_prompt(prompt) if ult is not None else prompt
    tokens = (
        [client.next_token(request)] if max_new_tokens == 1 else client.generate(request, max_new_tokens, stop_at_eos)
    )
    ids, pieces, remaining = [], [], 0
    for token in tokens:
        ids.append(token.id)
        remaining = token.queries_remaining
        if ult is None:
            pieces.append(token.text)
            if echo is not None:
                echo(token.text)
    return Continuation(ids, ult.decode(ids) if ult is not None else "".join(pieces), remaining)


def _echo(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address", default="127.0.0.1:50051", help="host:port of 'privtune serve' (default 127.0.0.1:50051)"
    )
    parser.add_argument("--prompt", default="", help="text to continue")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=16,
        help="tokens to sample; each is one query of the budget (default 16; 1 uses NextToken)",
    )
    parser.add_argument("--stop-at-eos", action="store_true", help="stop after the end-of-sequence token")
    parser.add_argument("--status", action="store_true", help="show the service's budget and health, sample nothing")
    parser.add_argument("--table", help="ULT table: encode the prompt and decode the output locally with it")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--key-file", help="the ULT key file the table was made with")
    key.add_argument("--passphrase", help="the ULT passphrase the table was made with")
    parser.add_argument(
        "--tls-ca",
        metavar="PEM",
        help="CA certificate the service's TLS certificate is signed by "
        "(deploy/certs/ca.crt); without it the connection is plaintext",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per call (default 300)")


def run(args: argparse.Namespace) -> int:
    tls_ca = None
    if args.tls_ca:
        try:
            tls_ca = Path(args.tls_ca).read_bytes()
        except OSError as err:
            raise PrivtuneError(f"cannot read --tls-ca: {err}") from None
    with InferenceClient(args.address, args.timeout, tls_ca) as client:
        if args.status:
            print_status(client.health(), client.budget_status())
            return 0
        ult = None
        if args.table:
            from privtune.common.ult.tokenizer import UltTokenizer

            ult = UltTokenizer.from_files(args.table, key_file=args.key_file, passphrase=args.passphrase)
        elif args.key_file or args.passphrase:
            raise PrivtuneError("--key-file/--passphrase need --table (the ULT table they belong to)")
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
        result = sample(client, args.prompt, args.max_new_tokens, args.stop_at_eos, ult, echo=_echo)
        if ult is not None:
            sys.stdout.write(result.text)
        sys.stdout.write("\n")
        print(
            f"[{len(result.ids)} token(s) privately sampled; {result.queries_remaining} queries left in the "
            "service's budget]",
            file=sys.stderr,
        )
    return 0


def print_status(health: dict, budget: dict) -> None:
    print(
        f"service: {health['status']}, {health['replicas']} replica(s), {health['n_members']} members of "
        f"{health['model']} (vocabulary {health['vocab_size']})"
    )
    print(
        f"budget: {budget['queries_spent']} of {budget['queries_total']} queries spent; "
        f"({budget['epsilon']:g}, {budget['delta']:g})-DP at alpha {budget['alpha']} "
        f"(RDP {budget['rdp_spent']:.4g} of {budget['rdp_total']:.4g}, epsilon spent so far "
        f"{budget['epsilon_spent']:.4g}); "
        f"q={budget['q']:g}, {projection_text(budget)}; ledger {budget['ledger']}"
        + ("; EXHAUSTED" if budget["exhausted"] else "")
    )


def projection_text(budget: dict) -> str:
    """How far the service lets a member move from the public model, in the terms of its projection."""
    if budget["projection"] == "box":
        return (
            f"box projection: every member's token probabilities within e^-{budget['box_lower']:.3g} to "
            f"e^{budget['box_upper']:.3g} times the public model's"
        )
    return f"Renyi-ball projection, beta={budget['beta']:.4g}"
