"""``privtune demo``: the whole pipeline on the embedded defaults.

Until the federated pipeline lands this shows the embedded defaults being loaded: the packaged
SmolLM2 (converted once) and the corpus partitions the simulated data owners will hold.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--owners", type=int, default=4, help="number of simulated data owners")


def run(args: argparse.Namespace) -> int:
    from common.corpus import private_partitions, public_corpus
    from common.models import load_model

    loaded = load_model("smollm2")
    print(f"foundation model: {loaded.source} ({sum(p.numel() for p in loaded.model.parameters()) / 1e6:.0f} M parameters)")
    print(f"public corpus: {len(public_corpus())} Milton texts")
    for i, part in enumerate(private_partitions(args.owners)):
        print(f"data owner {i}: {len(part)} works, e.g. {part[0].name}")
    return 0
