"""The demo's serving acts: the model owner serves the data owners' member adapters with PMixED, and a
user asks for a few private continuations over gRPC.

Everything goes through what a user runs: ``privtune serve``'s start-up (Ray, the budget actor,
replicas, the gRPC server on a free loopback port) from a typed ``ServeConfig``, and ``privtune
query``'s client. For a ULT federation the user is a key holder: it supplies p0 in the key's order
(``privtune ult keyed-public``), encodes prompts and decodes the ids on its side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMPTS = ("To be, or not to be", "My lord, I ", "O Romeo, Romeo")


@dataclass(frozen=True)
class KeyHolder:
    """A ULT federation's table and key, held by the user of the service (never by the model owner)."""

    model: Path
    table: Path
    key: Path


@dataclass(frozen=True)
class DemoServing:
    """The service's budget: T sized so that a demo can pay for three continuations; the service's own default
    projection and member sampling rate."""

    tokens: int = 32
    queries: int = 128
    epsilon: float = 8.0


@dataclass
class Served:
    """What the demo shows of a service: its continuations and its budget at the end."""

    continuations: list[tuple[str, str]] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def serve_and_sample(run: Path, settings: DemoServing, key_holder: KeyHolder | None = None) -> Served:
    from privtune.client.query import InferenceClient, print_status, sample
    from privtune.server.inference import cli as serve_cli

    public_embeddings = None
    if key_holder is not None:
        from privtune.common.models import load_model
        from privtune.common.ult.relabel import key_rows, save_keyed_public

        rows = key_rows(key_holder.table, key_holder.key)
        public_embeddings = str(
            save_keyed_public(load_model(str(key_holder.model)).model, rows, run / "keyed-p0.safetensors")
        )
    config = serve_cli.ServeConfig(
        run=str(run),
        public_embeddings=public_embeddings,
        queries=settings.queries,
        epsilon=settings.epsilon,
        num_cpus=2,
        port=0,
    )
    print(
        f"\n[demo] PMixED service over {run}: each owner's member adapter (trained from the public start on "
        f"that owner's data alone) with the public model as p0; ({settings.epsilon:g}, {config.delta:g})-DP per "
        f"member's data over {settings.queries} queries, {config.projection} projection",
        flush=True,
    )
    served = Served()
    running = serve_cli.start(config)
    try:
        with InferenceClient(f"127.0.0.1:{running.port}") as client:
            status = client.budget_status()
            prompts = PROMPTS[: (status["queries_total"] - status["queries_spent"]) // settings.tokens]
            if not prompts:
                served.note = (
                    f"the service's budget cannot pay for another {settings.tokens}-token continuation: these "
                    f"members were queried before (ledger {running.service.config.ledger}); delete the demo folder "
                    "to train fresh members"
                )
                print(f"[demo] {served.note}")
            else:
                ult = None
                if key_holder is not None:
                    from privtune.common.ult.tokenizer import UltTokenizer

                    ult = UltTokenizer.from_files(key_holder.table, key_file=key_holder.key)
                print(
                    f"private continuations ({settings.tokens} tokens each, every token one query"
                    + ("; the key holder encodes and decodes locally, the service sees ids only):" if ult else "):")
                )
                for prompt in prompts:
                    text = sample(client, prompt, settings.tokens, ult=ult).text
                    served.continuations.append((prompt, text))
                    print(f"  {prompt!r} -> {text!r}")
            print()
            served.budget = client.budget_status()
            print_status(client.health(), served.budget)
    finally:
        running.stop()
    return served


def markdown_served(title: str, served: Served) -> list[str]:
    from privtune.client.query import projection_text

    lines = [f"## {title}", ""]
    if served.note:
        lines += [served.note, ""]
    lines += [f"- *{prompt}* → {text!r}" for prompt, text in served.continuations]
    budget = served.budget
    if budget:
        lines += [
            "",
            f"Budget: {budget['queries_spent']} of {budget['queries_total']} queries spent; "
            f"({budget['epsilon']:g}, {budget['delta']:g})-DP per member's data over all queries "
            f"(epsilon spent so far {budget['epsilon_spent']:.3g}); member sampling rate q={budget['q']:g}, "
            f"{projection_text(budget)}.",
        ]
    return lines + [""]
