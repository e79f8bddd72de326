"""``privtune demo``: the whole pipeline on the embedded defaults, in a few minutes on 2 cores.

Two federations, each ending with the PMixED service:

1. **ULT**: the model owner's small LLaMA, pretrained on Milton encoded with the public ULT table
   (cached after the first run). Four data owners agree on a federation key, perturb their text
   with token-level LDP over SmolLM2's embeddings, encode it with the keyed table and train LoRA
   adapters against the emulator. A key holder evaluates the run and asks the service for private
   continuations, encoding and decoding on its side.
2. **SmolLM2**: two data owners fine-tune SmolLM2-135M's adapter on their own tokenizer with
   DP-SGD (epsilon 8 per training example); the service over their member adapters writes
   continuations a person can read.

Every owner's ledger, each guarantee with its unit and scope, and the continuations go into
``report.md`` in the demo folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from privtune.common.federation.config import FederationConfig

SMOLLM2_SETTINGS: dict[str, Any] = {
    "model": "smollm2",
    "encoding": "raw",
    "dp-epsilon": 8.0,
    "k-bottom": 2,
    "k-top": 2,
    "n-emulator": 2,
    "local-steps": 8,
    "batch-size": 8,
    "block-size": 64,
    "max-train-blocks": 64,
    "learning-rate": 0.003,
}
ULT_SETTINGS: dict[str, Any] = {
    "encoding": "ult",
    "ldp-embedding": "smollm2",
    "k-bottom": 2,
    "k-top": 2,
    "n-emulator": 1,
    "local-steps": 30,
    "batch-size": 8,
    "block-size": 128,
    "max-train-blocks": 64,
    "learning-rate": 0.003,
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owners", type=int, default=4, help="data owners of the ULT federation (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the ULT federation (default 3)")
    parser.add_argument("--ldp-epsilon", type=float, default=8.0, help="per-token LDP epsilon parameter (default 8)")
    parser.add_argument(
        "--skip-smollm2", action="store_true", help="only the ULT federation (the SmolLM2 one takes a few minutes)"
    )
    parser.add_argument("--out", default="runs/demo", help="demo folder (default runs/demo)")


def federation(out: Path, owners: int, rounds: int, settings: dict[str, Any]) -> dict[str, Any]:
    from privtune.simulate import simulate

    cfg = FederationConfig.from_run_config(
        {**settings, "num-server-rounds": rounds, "min-train-nodes": min(2, owners), "run-dir": str(out / "server")}
    )
    return simulate(cfg, owners, out)


def ldp_reading(epsilon: float, embedding: str = "smollm2", pairs: int = 4000) -> str:
    """What per-token metric LDP means on this embedding, in one line."""
    import torch

    from privtune.common.ldp.embedding import load_embedding

    points = load_embedding(embedding).points
    index = torch.randint(0, points.shape[0], (2, pairs), generator=torch.Generator().manual_seed(0))
    median = float((points[index[0]] - points[index[1]]).norm(dim=1).median())
    return (
        f"LDP reading: a token replaced by one at embedding distance d is epsilon*d = {epsilon:g}*d indistinguishable; "
        f"two typical tokens of {embedding} are d = {median:.2f} apart, so an observer's odds of which one was "
        f"written move by at most e^{epsilon * median:.1f} per token, and the figures add up over a document"
    )


def print_ledgers(out: Path, owners: int) -> None:
    from privtune.common.ledger import Ledger, render

    print(f"\nprivacy report of {out.name} (each data owner's ledger; it stays on the owner's site)")
    for i in range(owners):
        ledger = out / "owners" / f"owner-{i}" / "ledger.sqlite"
        if ledger.exists():
            print(f"\n== owner-{i} ==\n{render(Ledger(ledger, read_only=True).report())}")


def run(args: argparse.Namespace) -> int:
    from privtune.common.models import ULT_TABLE_FILE
    from privtune.demo_model import demo_model
    from privtune.demo_serving import DemoServing, KeyHolder, markdown_served, serve_and_sample
    from privtune.report import markdown_run_section, write_markdown_report
    from privtune.simulate import federation_key_path

    root = Path(args.out)
    sections: list[list[str]] = []
    model = demo_model()
    ult_out = root / "ult"
    print(
        f"[demo] 1/2: ULT federation: {args.owners} data owners, {args.rounds} rounds, LDP epsilon "
        f"{args.ldp_epsilon:g} per token",
        flush=True,
    )
    metrics = federation(
        ult_out, args.owners, args.rounds, {**ULT_SETTINGS, "model": str(model), "ldp-epsilon": args.ldp_epsilon}
    )
    print_ledgers(ult_out, args.owners)
    reading = ldp_reading(args.ldp_epsilon)
    print(f"\n{reading}")
    print(f"\nsummary: {json.dumps({k: metrics.get(k) for k in ('zero_shot_ppl', 'plugin_ppl')})}")
    key_holder = KeyHolder(model, model / ULT_TABLE_FILE, federation_key_path(ult_out))
    ult_served = serve_and_sample(ult_out / "server", DemoServing(), key_holder)
    sections += [
        [*markdown_run_section("ULT federation (LDP, keyed ULT, LoRA)", ult_out, root), reading, ""],
        markdown_served("Private continuations from the ULT federation (decoded by a key holder)", ult_served),
    ]
    if not args.skip_smollm2:
        smol_out = root / "smollm2"
        print(
            "\n[demo] 2/2: SmolLM2 federation: 2 data owners, 2 rounds, DP-SGD epsilon 8, readable output", flush=True
        )
        federation(smol_out, 2, 2, SMOLLM2_SETTINGS)
        print_ledgers(smol_out, 2)
        smol_served = serve_and_sample(smol_out / "server", DemoServing(tokens=24, q=0.5))
        sections += [
            markdown_run_section("SmolLM2 federation (DP-SGD, LoRA)", smol_out, root),
            markdown_served("Private continuations from the SmolLM2 federation", smol_served),
        ]
    report = write_markdown_report(root, "privtune demo", sections)
    print(f"\nreport: {report}")
    return 0
