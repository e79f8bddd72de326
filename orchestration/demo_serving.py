"""The demo's last act: the model owner serves the data owners' adapters with PMixED, and a key
holder asks for a few private continuations over gRPC.

Everything goes through what a user runs: a key holder's keyed p0 (``privtune ult keyed-public``),
``privtune serve``'s start-up (Ray, the budget actor, replicas, the gRPC server on a free loopback
port) and ``privtune query``'s client, which ULT-encodes the prompt and decodes the ids locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROMPTS = ("To be, or not to be", "My lord, I ", "O Romeo, Romeo")


@dataclass(frozen=True)
class DemoServing:
    """The service's budget (DESIGN.md section 5 defaults, with T and q sized for four owners and a demo)."""

    tokens: int = 32
    queries: int = 128
    q: float = 0.25
    epsilon: float = 8.0


def serve_and_sample(run: Path, model: Path, table: Path, key: Path, settings: DemoServing = DemoServing()) -> None:
    from privtune.client.query import InferenceClient, print_status, sample
    from privtune.common.models import load_model
    from privtune.common.ult.relabel import key_rows, save_keyed_public
    from privtune.common.ult.tokenizer import UltTokenizer
    from privtune.server.inference import cli as serve_cli

    keyed_p0 = save_keyed_public(load_model(str(model)).model, key_rows(table, key), run / "keyed-p0.safetensors")
    config = serve_cli.ServeConfig(
        run=str(run),
        public_embeddings=str(keyed_p0),
        queries=settings.queries,
        q=settings.q,
        epsilon=settings.epsilon,
        num_cpus=2,
        port=0,
    )
    print(
        f"\n[demo] PMixED service: the owners' adapters as ensemble members, the public model as p0 (in the key's "
        f"order, from a key holder); ({settings.epsilon:g}, {config.delta:g})-DP over {settings.queries} queries, "
        f"member sampling rate q={settings.q:g}",
        flush=True,
    )
    running = serve_cli.start(config)
    try:
        with InferenceClient(f"127.0.0.1:{running.port}") as client:
            status = client.budget_status()
            prompts = PROMPTS[: (status["queries_total"] - status["queries_spent"]) // settings.tokens]
            if not prompts:
                print(
                    f"[demo] the service's budget cannot pay for another {settings.tokens}-token continuation: these "
                    f"members were queried before (ledger {running.service.config.ledger}). Raise the budget "
                    "deliberately ('privtune ledger budget'), or retire it ('privtune ledger reset') and train "
                    "fresh members."
                )
            else:
                ult = UltTokenizer.from_files(table, key_file=key)
                print(
                    f"private continuations ({settings.tokens} tokens each, every token one query; the key holder "
                    "encodes and decodes locally, the service sees ids only; U+FFFD marks a patch that does not "
                    "decode):"
                )
                for prompt in prompts:
                    continuation = sample(client, prompt, settings.tokens, ult=ult)
                    print(f"  {prompt!r} -> {continuation.text!r}")
            print()
            print_status(client.health(), client.budget_status())
    finally:
        running.stop()
