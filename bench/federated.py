"""Federated round cost: wall time split (train / communicate / aggregate / evaluate) and bytes per
round for N = 2, 4, 8 simulated owners, adapter-only rounds vs what naive FedAvg of the whole model
would move.

Runs the real ServerApp/ClientApps on Flower's Simulation Engine with the tiny LLaMA (so all three
sizes fit in a few minutes on 2 cores), and computes the same communication ratio for SmolLM2-135M
with a 2-8-2 LoRA adapter from the actual package and adapter tensors.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.harness import print_table, write_results
from privtune.common.federation.config import FederationConfig
from privtune.simulate import simulate

OWNERS = (2, 4, 8)
SETTINGS = {
    "model": "tiny-llama",
    "num-server-rounds": 2,
    "local-steps": 10,
    "batch-size": 8,
    "block-size": 64,
    "max-train-blocks": 64,
    "k-bottom": 1,
    "k-top": 1,
    "n-emulator": 2,
}


def tensor_bytes(state) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def smollm2_ratio() -> dict[str, float]:
    from privtune.common.models import load_model
    from privtune.common.offsite.adapter import adapter_state
    from privtune.common.offsite.config import OffsiteConfig
    from privtune.common.offsite.package import EmulatorPackage

    model = load_model("smollm2").model
    package = EmulatorPackage.build(model, OffsiteConfig(k_bottom=2, k_top=2, n_emulator=8, adapter="lora", lora_r=8))
    adapter = tensor_bytes(adapter_state(package.instantiate(seed=0)))
    full = tensor_bytes(dict(model.named_parameters()))
    emulator = tensor_bytes(package.to_parts()[0])
    return {
        "full_model_bytes": full,
        "adapter_bytes": adapter,
        "emulator_package_bytes": emulator,
        "comm_ratio_full_vs_adapter": full / adapter,
    }


def main() -> None:
    rows, round_s, per_n = [], {}, {}
    for n in OWNERS:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = FederationConfig.from_run_config(
                {**SETTINGS, "run-dir": str(Path(tmp) / "server"), "min-train-nodes": n}
            )
            metrics = simulate(cfg, owners=n, out=Path(tmp))
            full_model_bytes = sum(p.stat().st_size for p in (Path(tmp) / "server" / "model").glob("*.safetensors"))
        steady = metrics["rounds"][-1]
        timing = steady["timing"]
        moved = steady["bytes_down"] + steady["bytes_up"]
        naive = 2 * n * full_model_bytes
        round_s[str(n)] = timing["wall_s"]
        per_n[str(n)] = {
            **timing,
            "bytes_adapter_round": moved,
            "bytes_full_model_round": naive,
            "bytes_first_round": metrics["rounds"][0]["bytes_down"] + metrics["rounds"][0]["bytes_up"],
            "comm_ratio": naive / moved,
        }
        rows.append(
            [
                n,
                timing["wall_s"],
                timing["train_s"],
                timing["communicate_s"],
                timing["aggregate_s"],
                timing["evaluate_s"],
                moved / 1e6,
                naive / 1e6,
                naive / moved,
            ]
        )
    print_table(
        "steady-state round (round 2: adapters only), tiny LLaMA",
        ["owners", "round s", "train s", "comm s", "aggr s", "eval s", "MB moved", "MB naive", "ratio"],
        rows,
    )
    smol = smollm2_ratio()
    print_table(
        "SmolLM2-135M, 2-8-2 LoRA r=8: bytes per owner per direction",
        ["full model MB", "adapter MB", "emulator package MB", "full/adapter"],
        [
            [
                smol["full_model_bytes"] / 1e6,
                smol["adapter_bytes"] / 1e6,
                smol["emulator_package_bytes"] / 1e6,
                smol["comm_ratio_full_vs_adapter"],
            ]
        ],
    )
    base = round_s[str(OWNERS[0])]
    write_results(
        "federated",
        {
            "comm_ratio_full_vs_adapter": smol["comm_ratio_full_vs_adapter"],
            "comm_ratio_full_vs_adapter_tiny": per_n[str(OWNERS[-1])]["comm_ratio"],
            "round_s": round_s,
            "round_time_ratio_vs_2_owners": {k: v / base for k, v in round_s.items()},
            "per_owner_count": per_n,
            "smollm2": smol,
            "settings": SETTINGS,
        },
    )


if __name__ == "__main__":
    main()
