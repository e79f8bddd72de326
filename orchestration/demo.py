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
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privtune.common.federation.config import FederationConfig
from privtune.demo_serving import DemoServing, KeyHolder, markdown_served, serve_and_sample

if TYPE_CHECKING:
    import torch

SMOLLM2_SETTINGS: dict[str, Any] = {
    "model": "smollm2",
    "encoding": "raw",
    "dp-epsilon": 8.0,
    # A record is a paragraph; its first 64 tokens train (72% of the owners' text here, and the unit and
    # epsilon are unchanged). The longest paragraph would otherwise pad every DP-SGD example to 148 tokens.
    "dp-record-max-tokens": 64,
    "k-bottom": 2,
    "k-top": 2,
    "n-emulator": 2,
    "local-steps": 8,
    "member-steps": 8,
    "batch-size": 8,
    "block-size": 64,
    "max-train-blocks": 64,
    "learning-rate": 0.003,
}
"""Each PMixED member trains one round's worth of steps (member-steps), not the whole federated track's: the
service pays for three continuations, and on 2 cores the member track was the federation's longest part."""
NO_PRIVACY: dict[str, Any] = {"ldp-epsilon": 0.0, "dp-epsilon": 0.0, "member-shards": 0}
"""What the non-private reference turns off: both mechanisms, and the PMixED members no one will serve."""
ULT_SETTINGS: dict[str, Any] = {
    "encoding": "ult",
    "ldp-embedding": "smollm2",
    "k-bottom": 2,
    "k-top": 2,
    "n-emulator": 1,
    "local-steps": 30,
    "member-steps": 30,
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


def federation(
    out: Path, owners: int, rounds: int, settings: dict[str, Any], shared_key: Path | None = None
) -> dict[str, Any]:
    from privtune.simulate import simulate

    cfg = FederationConfig.from_run_config(
        {**settings, "num-server-rounds": rounds, "min-train-nodes": min(2, owners), "run-dir": str(out / "server")}
    )
    return simulate(cfg, owners, out, shared_key=shared_key)


def prepare_ldp(epsilon: float, embedding: str = "smollm2") -> str:
    """Build once, in this process, the public artifacts every owner's LDP mechanism needs; the reading of its
    guarantee.

    The SmolLM2 safetensors copy, the embedding's diameter bound and SanText's proposal cover are cached by
    content. Simulated owners start together: left to them, two would convert and measure the same public
    embedding side by side on the same two cores.
    """
    from privtune.common.ldp.mechanisms import SanText
    from privtune.common.ldp.perturb import LdpConfig, build_mechanism

    mechanism = build_mechanism(LdpConfig(epsilon=epsilon, embedding=embedding))
    _ = mechanism.guarantee  # the diameter bound
    if isinstance(mechanism, SanText):
        _ = mechanism.proposals  # the proposal cover
    return ldp_reading(epsilon, mechanism.space.points, embedding)


def ldp_reading(epsilon: float, points: torch.Tensor, embedding: str, pairs: int = 4000) -> str:
    """What per-token metric LDP means on this embedding (its rows ``points``), in one line."""
    import torch

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


ULT_SERVING = DemoServing()
SMOLLM2_SERVING = DemoServing(tokens=24)


def pmixed_row(settings: DemoServing) -> tuple[str, str]:
    """Why the report's PMixED row has no perplexity."""
    return (
        "PMixED service over the owners' members (private inference)",
        "not measured: scoring the held-out text takes one query per token, far past the service's budget of "
        f"{settings.queries} queries, which pays for the continuations below",
    )


def reference_federation(private_out: Path, owners: int, rounds: int, settings: dict[str, Any]) -> Path:
    """The same federation with its privacy mechanisms off: same owners, text, rounds, steps and seed.

    Only a harness that holds every owner's raw text can run it, and no owner would release its result;
    it is the report's non-private fine-tuned row, the price each private path is measured against. In
    ULT mode it reuses the private run's federation key, so both are scored on the same held-out ids.
    """
    from privtune.simulate import federation_key_path

    out = private_out.with_name(f"{private_out.name}-reference")
    key = federation_key_path(private_out) if settings.get("encoding") == "ult" else None
    federation(out, owners, rounds, {**settings, **NO_PRIVACY}, key)
    return out


def run(args: argparse.Namespace) -> int:
    # Set before torch loads OpenMP: on 2 shared cores a spinning OpenMP thread whose partner is descheduled
    # burns its core (a pretraining step took 13 s instead of 0.9 s at load 6); sleeping costs nothing idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from privtune.common.models import ULT_TABLE_FILE
    from privtune.demo_model import demo_model
    from privtune.demo_phases import PhaseClock
    from privtune.report import markdown_run_section, write_markdown_report
    from privtune.simulate import federation_key_path

    root = Path(args.out)
    clock = PhaseClock()
    sections: list[list[str]] = []
    with clock.phase("ULT demo model (pretrained on the first run, then cached)"):
        model = demo_model()
    with clock.phase("SmolLM2 weights and LDP geometry (built on the first run, then cached)"):
        reading = prepare_ldp(args.ldp_epsilon)
    ult_out = root / "ult"
    ult_settings = {**ULT_SETTINGS, "model": str(model), "ldp-epsilon": args.ldp_epsilon}
    print(
        f"[demo] 1/2: ULT federation: {args.owners} data owners, {args.rounds} rounds, LDP epsilon "
        f"{args.ldp_epsilon:g} per token",
        flush=True,
    )
    with clock.phase("ULT federation"):
        metrics = federation(ult_out, args.owners, args.rounds, ult_settings)
    print_ledgers(ult_out, args.owners)
    print(f"\n{reading}")
    print(f"\nsummary: {json.dumps({k: metrics.get(k) for k in ('zero_shot_ppl', 'plugin_ppl')})}")
    print("\n[demo] ULT federation again without LDP: the non-private reference of the report", flush=True)
    with clock.phase("ULT non-private reference"):
        ult_reference = reference_federation(ult_out, args.owners, args.rounds, ult_settings)
    key_holder = KeyHolder(model, model / ULT_TABLE_FILE, federation_key_path(ult_out))
    with clock.phase("ULT PMixED service"):
        ult_served = serve_and_sample(ult_out / "server", ULT_SERVING, key_holder)
    sections += [
        [
            *markdown_run_section(
                "ULT federation (LDP, keyed ULT, LoRA)", ult_out, root, ult_reference, (pmixed_row(ULT_SERVING),)
            ),
            reading,
            "",
        ],
        markdown_served("Private continuations from the ULT federation (decoded by a key holder)", ult_served),
    ]
    if not args.skip_smollm2:
        smol_out = root / "smollm2"
        print(
            "\n[demo] 2/2: SmolLM2 federation: 2 data owners, 2 rounds, DP-SGD epsilon 8, readable output", flush=True
        )
        with clock.phase("SmolLM2 federation"):
            federation(smol_out, 2, 2, SMOLLM2_SETTINGS)
        print_ledgers(smol_out, 2)
        print("\n[demo] SmolLM2 federation again without DP-SGD: the non-private reference of the report", flush=True)
        with clock.phase("SmolLM2 non-private reference"):
            smol_reference = reference_federation(smol_out, 2, 2, SMOLLM2_SETTINGS)
        with clock.phase("SmolLM2 PMixED service"):
            smol_served = serve_and_sample(smol_out / "server", SMOLLM2_SERVING)
        sections += [
            markdown_run_section(
                "SmolLM2 federation (DP-SGD, LoRA)", smol_out, root, smol_reference, (pmixed_row(SMOLLM2_SERVING),)
            ),
            markdown_served("Private continuations from the SmolLM2 federation", smol_served),
        ]
    print(f"\n{clock.summary()}")
    report = write_markdown_report(root, "privtune demo", [*sections, clock.markdown()])
    print(f"\nreport: {report}")
    return 0
