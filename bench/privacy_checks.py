"""Do the printed guarantees hold for what the code does? Exact laws, brute-force diameters, timing.

- samplers: for SanText and CusText on SmolLM2 at epsilon 1, 8 and 20, the law each sampler actually
  draws from (exact integer weights K / N, not samples) against its design, and the worst log-ratio
  between two inputs against the printed per-token epsilon (SanText: the diameter pair; CusText: all
  pairs of every cell). For PMixED's token sampler, the exact rational law of a draw from a float64
  vector spread far below 2^-53 against that vector normalised.
- diameter: the pruned diameter search against brute force on random point clouds (misses counted).
- pmixed_timing: the time of one PMixED query on a tiny ensemble by the size of S (the per-query
  work is constant by design; this measures what is left).

Member provenance (which owners each served PMixED member depends on) is its own check, added as
another entry of ``CHECKS``.

    python -m bench.privacy_checks
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import torch

from bench.harness import RESULTS_DIR, print_table, write_results

EPSILONS = (1.0, 8.0, 20.0)
SMOLLM2_DIAMETER_PAIR = (216, 3427)
CLOUDS = 3000
TIMED_QUERIES = 200
ROWS_PER_CHUNK = 1024


def _law_figures(implemented: torch.Tensor, designed_log: torch.Tensor) -> float:
    return float((implemented.log() - designed_log).abs().max())


def santext_check(space, epsilon: float) -> dict[str, Any]:
    from privtune.common.ldp import SanText
    from privtune.common.ldp.sampling import FLOOR, scale_bits

    santext = SanText(space, epsilon)
    pair = torch.tensor(SMOLLM2_DIAMETER_PAIR)
    law = santext.probabilities(pair)
    weights = space.distances(pair).mul_(-epsilon / 2.0).exp_()
    floored = weights * 2.0 ** scale_bits(space.size) + FLOOR
    designed = floored.log() - floored.sum(dim=1, keepdim=True).log()
    exponential = weights.log() - weights.sum(dim=1, keepdim=True).log()
    return {
        "one_sided_outputs": int(((law[0] > 0) != (law[1] > 0)).sum()),
        "worst_pair_log_ratio": float((law[0].log() - law[1].log()).abs().max()),
        "printed_token_epsilon": santext.guarantee.token_epsilon,
        "implemented_vs_floored_design": _law_figures(law, designed),
        "implemented_vs_exponential_mechanism": _law_figures(law, exponential),
    }


def custext_check(space, epsilon: float) -> dict[str, Any]:
    from privtune.common.ldp import CusText
    from privtune.common.ldp.sampling import implemented_law

    custext = CusText(space, epsilon, top_k=20)
    members = custext.members[custext.cells]  # row x: x's cell, in the order of its integer table row
    valid = members >= 0
    implemented = implemented_law(custext.table)
    dist = torch.cat(
        [
            (space.points[start : start + ROWS_PER_CHUNK, None, :] - space.points[chunk]).norm(dim=2)
            for start, chunk in zip(range(0, space.size, ROWS_PER_CHUNK), members.clamp_min(0).split(ROWS_PER_CHUNK))
        ]
    ).masked_fill_(~valid, 0.0)
    logits = (dist / dist.amax(dim=1, keepdim=True) * (-epsilon / 2.0)).masked_fill_(~valid, -math.inf)
    designed = torch.log_softmax(logits, dim=1)
    return {
        "one_sided_outputs": int(((implemented > 0) != valid).sum()),
        "worst_pair_log_ratio": custext.guarantee.token_epsilon,
        "printed_token_epsilon": custext.guarantee.token_epsilon,
        "implemented_vs_exponential_mechanism": float((implemented.log() - designed)[valid].abs().max()),
    }


def pmixed_sampler_check() -> dict[str, Any]:
    """The token sampler's exact law on a softmax with an enormous spread, against the vector normalised."""
    from privtune.common.pmixed.mechanism import buckets

    logits = torch.from_numpy(np.random.default_rng(0).normal(scale=60.0, size=4096))
    probs = torch.softmax(logits, dim=0)
    b = buckets(probs)
    grand = sum(b.totals)
    bounds = [*b.starts.tolist(), len(b.support)]
    total = sum(Fraction(float(p)) for p in probs)
    worst = 0.0
    for bucket, weight in enumerate(b.totals):
        in_bucket = sum(int(m) for m in b.mantissas[bounds[bucket] : bounds[bucket + 1]])
        for i in range(bounds[bucket], bounds[bucket + 1]):
            implemented = Fraction(weight, grand) * Fraction(int(b.mantissas[i]), in_bucket)
            designed = Fraction(float(probs[int(b.support[i])])) / total
            worst = max(worst, abs(math.log(implemented / designed)))
    return {
        "outputs": len(probs),
        "smallest_probability": float(probs[probs > 0].min()),
        "zero_outputs_drawable": len(b.support) != int((probs > 0).sum()),
        "implemented_vs_designed": worst,
    }


def samplers() -> dict[str, Any]:
    from privtune.common.ldp import load_embedding

    space = load_embedding("smollm2")
    figures: dict[str, Any] = {"pmixed": pmixed_sampler_check()}
    for name, check in (("santext", santext_check), ("custext", custext_check)):
        figures[name] = {f"{eps:g}": check(space, eps) for eps in EPSILONS}
    return figures


def random_cloud(rng: np.random.Generator) -> np.ndarray:
    """Varied size, dimension and spread: isotropic, radially spread, anisotropic, clustered, planted outliers."""
    n, dim = int(rng.integers(2, 120)), int(rng.integers(1, 24))
    shape = rng.integers(5)
    points = rng.normal(size=(n, dim))
    if shape == 1:
        points *= rng.uniform(0.05, 1.0, size=(n, 1))
    elif shape == 2:
        points *= rng.lognormal(0.0, 1.5, size=dim)
    elif shape == 3:
        centres = rng.normal(scale=5.0, size=(int(rng.integers(1, 5)), dim))
        points = centres[rng.integers(len(centres), size=n)] + 0.1 * points
    elif shape == 4:
        points[rng.integers(n, size=2)] *= 4.0
    return points * 10.0 ** rng.uniform(-3, 3) + rng.normal(scale=10.0 ** rng.uniform(-3, 3), size=dim)


def diameter_misses(clouds: int = CLOUDS, seed: int = 13) -> dict[str, Any]:
    """Clouds where the pruned search falls short of brute force by more than the rounding bound."""
    from scipy.spatial.distance import pdist

    from privtune.common.ldp import EmbeddingSpace
    from privtune.common.ldp.geometry import BYTES_PER_FLOAT64, largest_distance
    from privtune.common.text_tokenizer import ByteTokenizer

    rng = np.random.default_rng(seed)
    misses, worst_shortfall = 0, 0.0
    for _ in range(clouds):
        points = random_cloud(rng)
        space = EmbeddingSpace.from_matrix(torch.tensor(points), ByteTokenizer(), name="cloud")
        rows_per_block = int(rng.integers(1, len(points) + 1))
        found = largest_distance(space, memory_cap_bytes=rows_per_block * len(points) * BYTES_PER_FLOAT64)
        exact = float(pdist(points).max())
        if found + space.rounding_bound < exact:
            misses += 1
            worst_shortfall = max(worst_shortfall, 1.0 - found / exact)
    return {"clouds": clouds, "misses": misses, "worst_relative_shortfall": worst_shortfall}


def pmixed_timing() -> dict[str, Any]:
    """Median CPU and wall time of one query by |S|, under one budget (tiny GPT-2 ensemble, N = 4, q = 0.5).

    S is read off a copy of the generator taken before each query (the query's first draws are the
    subsample), so the queries timed are exactly the service's; all sizes interleave on one session,
    so load from other jobs on a shared machine falls on all of them alike.
    """
    import copy

    from privtune.common.models import tiny_model
    from privtune.common.offsite import OffsiteConfig, adapter_manifest, adapter_state, prepare_adapter
    from privtune.common.pmixed import PMixedBudget, poisson_subsample
    from privtune.common.pmixed.ensemble import Ensemble, MemberAdapter

    base = tiny_model("gpt2")
    members = []
    for seed in range(4):
        model = prepare_adapter(copy.deepcopy(base), OffsiteConfig(k_bottom=1, k_top=1, n_emulator=1), seed=seed)
        members.append(MemberAdapter(f"owner-{seed}", adapter_state(model), adapter_manifest(model)))
    session = Ensemble(base, members).session([5, 6, 7, 8])
    budget = PMixedBudget(epsilon=8.0, delta=1e-5, alpha=3, T=1, q=0.5, n_members=4)
    rng = np.random.default_rng(0)
    session.private_next_token(budget, rng)
    times: dict[int, dict[str, list[float]]] = {size: {"cpu": [], "wall": []} for size in range(5)}
    for _ in range(TIMED_QUERIES):
        size = len(poisson_subsample(budget.n_members, budget.q, copy.deepcopy(rng)))
        cpu, wall = time.process_time(), time.perf_counter()
        session.private_next_token(budget, rng)
        times[size]["cpu"].append(time.process_time() - cpu)
        times[size]["wall"].append(time.perf_counter() - wall)
    medians = {
        str(size): {clock: statistics.median(values) for clock, values in by_clock.items()}
        for size, by_clock in times.items()
        if by_clock["cpu"]
    }
    figures: dict[str, Any] = {"median_seconds_by_s_size": medians, "queries": TIMED_QUERIES}
    for clock in ("cpu", "wall"):
        values = [m[clock] for m in medians.values()]
        figures[f"largest_relative_spread_{clock}"] = max(values) / min(values) - 1.0
    return figures


def member_provenance() -> dict[str, Any]:
    """What each PMixED member of a federation depends on, and whether ``privtune serve`` accepts them.

    Trains the demo's federation shape on tiny-llama (4 owners, 2 rounds, one member per owner) and,
    where ``runs/demo`` exists, reads the demo's own runs too.
    """
    import json
    import tempfile
    from pathlib import Path

    from privtune.common.errors import PrivtuneError
    from privtune.common.federation.config import FederationConfig
    from privtune.server.inference.members import from_run_folder
    from privtune.simulate import simulate

    def provenance(run: Path) -> dict[str, Any]:
        adapters = run / "adapters"
        members = {
            p.name: json.loads((p / "manifest.json").read_text()).get("depends_on")
            for p in sorted(adapters.iterdir())
            if p.is_dir()
        }
        try:
            from_run_folder(run)
            verdict = "accepted"
        except PrivtuneError as err:
            verdict = f"refused: {err}"
        return {"members": members, "serve": verdict}

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cfg = FederationConfig.from_run_config(
            {"model": "tiny-llama", "num-server-rounds": 2, "local-steps": 5, "run-dir": str(out / "server")}
        )
        simulate(cfg, 4, out)
        figures = {"tiny-llama, 4 owners": provenance(out / "server")}
    for demo in (Path("runs/demo/ult/server"), Path("runs/demo/smollm2/server")):
        if (demo / "adapters").is_dir():
            figures[str(demo)] = provenance(demo)
    return figures


CHECKS: dict[str, Callable[[], dict[str, Any]]] = {
    "samplers": samplers,
    "diameter": diameter_misses,
    "pmixed_timing": pmixed_timing,
    "member_provenance": member_provenance,
}


def print_summary(figures: dict[str, Any]) -> None:
    if "samplers" in figures:
        rows = []
        for name in ("santext", "custext"):
            for eps, f in figures["samplers"][name].items():
                rows.append(
                    [
                        name,
                        eps,
                        f["one_sided_outputs"],
                        f["worst_pair_log_ratio"],
                        f["printed_token_epsilon"],
                        f.get("implemented_vs_floored_design", "-"),
                        f["implemented_vs_exponential_mechanism"],
                    ]
                )
        print_table(
            "Implemented laws (exact) on SmolLM2",
            ["sampler", "eps", "one-sided", "worst log-ratio", "printed eps", "vs floored design", "vs exp. mechanism"],
            rows,
        )
        pm = figures["samplers"]["pmixed"]
        print(f"\nPMixED token sampler: worst |log implemented/designed| = {pm['implemented_vs_designed']:.3g}")
    if "diameter" in figures:
        d = figures["diameter"]
        print(f"diameter: {d['misses']} misses on {d['clouds']} random clouds")
    if "pmixed_timing" in figures:
        t = figures["pmixed_timing"]
        by_size = ", ".join(f"|S|={k}: {v['cpu'] * 1e3:.2f}" for k, v in t["median_seconds_by_s_size"].items())
        print(
            f"PMixED query CPU ms by |S| ({by_size}); largest relative spread of the medians: "
            f"CPU {t['largest_relative_spread_cpu']:.1%}, wall {t['largest_relative_spread_wall']:.1%}"
        )
    for run, found in figures.get("member_provenance", {}).items():
        owners = {name: (dep or {}).get("owners") for name, dep in found["members"].items()}
        print(f"members of {run}: {owners}; serve: {found['serve']}")


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checks",
        nargs="+",
        choices=list(CHECKS),
        default=list(CHECKS),
        help="run only these checks; the others keep their figures from the last run",
    )
    args = parser.parse_args()
    previous = RESULTS_DIR / "privacy_checks.json"
    kept = json.loads(previous.read_text()) if previous.exists() and len(args.checks) < len(CHECKS) else {}
    figures = {name: kept[name] for name in CHECKS if name in kept and name not in args.checks}
    figures.update({name: CHECKS[name]() for name in args.checks})
    print_summary(figures)
    write_results("privacy_checks", figures)


if __name__ == "__main__":
    main()
