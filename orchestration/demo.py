"""``privtune demo``: the whole pipeline on the embedded defaults, in a few minutes on 2 cores.

1. The model owner makes a ULT-ready foundation model: a small LLaMA pretrained on Milton encoded
   with the public ULT table (cached after the first run).
2. Four data owners, each holding disjoint Shakespeare works, agree on a federation key, perturb
   their text with token-level LDP (SmolLM2's embeddings), encode it with the keyed table and
   fine-tune LoRA adapters against the emulator for three Flower rounds (Simulation Engine, Ray).
3. A key holder evaluates zero-shot / emulator / emulator + adapter / plug-in perplexity on held-out
   text, and each owner's privacy ledger is printed.
4. The model owner serves the owners' adapters as a PMixED ensemble on Ray behind gRPC; a key holder
   asks for a few privately sampled continuations, and the service's budget status closes the demo.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privtune.common.federation.config import FederationConfig


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owners", type=int, default=4, help="number of simulated data owners (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--ldp-epsilon", type=float, default=8.0, help="per-token LDP epsilon parameter (default 8)")
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")


def run(args: argparse.Namespace) -> int:
    from privtune.common.ledger import Ledger, render
    from privtune.common.models import ULT_TABLE_FILE
    from privtune.demo_model import demo_model
    from privtune.demo_serving import serve_and_sample
    from privtune.simulate import federation_key_path, simulate

    model = demo_model()
    out = Path(args.out)
    cfg = FederationConfig.from_run_config(
        {
            "model": str(model),
            "encoding": "ult",
            "num-server-rounds": args.rounds,
            "ldp-epsilon": args.ldp_epsilon,
            "ldp-embedding": "smollm2",
            "k-bottom": 2,
            "k-top": 2,
            "n-emulator": 1,
            "local-steps": 30,
            "batch-size": 8,
            "block-size": 128,
            "max-train-blocks": 64,
            "learning-rate": 0.003,
            "min-train-nodes": min(2, args.owners),
            "run-dir": str(out / "server"),
        }
    )
    print(
        f"[demo] {args.owners} data owners, {args.rounds} rounds, ULT encoding, LDP epsilon {args.ldp_epsilon} "
        "per token",
        flush=True,
    )
    metrics = simulate(cfg, args.owners, out)
    print("\nprivacy report (each data owner's ledger; it stays on the owner's site)")
    for i in range(args.owners):
        ledger = out / "owners" / f"owner-{i}" / "ledger.sqlite"
        if ledger.exists():
            print(f"\n== owner-{i} ==\n{render(Ledger(ledger, read_only=True).report())}")
    summary = {k: metrics.get(k) for k in ("zero_shot_ppl", "emulator_ppl", "emulator_adapter_ppl", "plugin_ppl")}
    print(
        f"\nsummary: {json.dumps(summary)}\n"
        f"run folder: {out} (metrics.json, privacy.json, server/plots/, server/model/)"
    )
    serve_and_sample(out / "server", model, model / ULT_TABLE_FILE, federation_key_path(out))
    return 0
