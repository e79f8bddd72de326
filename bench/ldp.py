"""Throughput of the token-level exponential mechanism (SanText) against a naive per-token loop.

Inputs are token sequences with natural-text-like repetition (Zipf ranks over a random permutation
of the vocabulary) for random 576-wide embeddings of 512, 8192 and 49152 rows, plus the real SmolLM2
embedding on real text, plus the whole-corpus figure: all 42 Shakespeare works of the embedded
corpus through SanText on SmolLM2, end to end (tokenise, perturb, decode; median phases of three
passes), sampled as ``SanText.sample`` does (rare tokens by exact proposals, frequent ones by their
whole row, ``common.ldp.envelope``) and, in the same run on the same ids, by whole rows only (each
distinct token's row computed once for all its occurrences), with the ratio of the two. The naive
baseline is the textbook loop: per token, distances to every row, softmax, one multinomial draw.
Its cost per token does not depend on repetition, so it is timed on a prefix of the same sequence.
Peak memory growth per case is measured by resetting the kernel's peak-RSS counter (Linux) before
the vectorised run.

    python -m bench.ldp
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from bench.harness import median_time, peak_rss_mb, print_table, write_results
from privtune.common.corpus import shakespeare_works
from privtune.common.ldp import CusText, EmbeddingSpace, SanText, load_embedding, make_generator
from privtune.common.ldp.geometry import greedy_cells, largest_distance
from privtune.common.text_tokenizer import ByteTokenizer

WIDTH = 576
EPSILON = 1.0
CASES = {512: (8192, 2048), 8192: (4096, 512), 49152: (2048, 96)}  # vocab: (tokens, naive prefix)
MEMORY_CAP_MB = 256.0
CORPUS_RUNS = 3
PHASES = ("tokenise_s", "perturb_s", "decode_s", "end_to_end_s")
SEEDS_TEXT = Path(__file__).resolve().parents[2] / "shared" / "seeds"


class IdTokenizer(ByteTokenizer):
    """Only the vocabulary size matters here: the benchmark perturbs token ids directly."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size


def zipf_tokens(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.2, size=n), vocab) - 1
    return torch.from_numpy(rng.permutation(vocab)[ranks])


def naive(space: EmbeddingSpace, ids: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    out = []
    for token in ids.tolist():
        logits = -EPSILON / 2 * space.distances(torch.tensor([token]))[0]
        out.append(int(torch.multinomial(torch.softmax(logits, dim=0), 1, generator=generator)))
    return torch.tensor(out)


def _status_mb(key: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_growth_mb(fn) -> float | None:
    """Peak RSS above the RSS before ``fn``; None where the counter cannot be reset."""
    try:
        open("/proc/self/clear_refs", "w").write("5")
    except OSError:
        return None
    before = _status_mb("VmRSS")
    fn()
    return _status_mb("VmHWM") - before


def measure(space: EmbeddingSpace, ids: torch.Tensor, naive_prefix: int) -> dict:
    mechanism = SanText(space, EPSILON, memory_cap_mb=MEMORY_CAP_MB)
    generator = make_generator(0)
    fast = median_time(lambda: mechanism.sample(ids, generator), repeats=3, warmup=1)
    slow = median_time(lambda: naive(space, ids[:naive_prefix], generator), repeats=1, warmup=0)
    return {
        "tokens": len(ids),
        "distinct": int(torch.unique(ids).numel()),
        "tokens_per_s": len(ids) / fast,
        "naive_tokens_per_s": naive_prefix / slow,
        "speedup_vs_naive": (len(ids) / fast) / (naive_prefix / slow),
        "peak_growth_mb": peak_growth_mb(lambda: mechanism.sample(ids, generator)),
    }


def corpus_pass(space: EmbeddingSpace, mechanism: SanText, works: list, seed: int) -> dict:
    """Tokenise, perturb and decode every work once, timed phase by phase."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    pieces = [space.encode(work.text) for work in works]
    tokenised = time.perf_counter()
    ids = torch.cat(pieces)
    perturbed = mechanism.sample(ids, make_generator(seed)).split([len(p) for p in pieces])
    sampled = time.perf_counter()
    texts = [space.decode(piece) for piece in perturbed]
    decoded = time.perf_counter()
    return {
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        "tokens": len(ids),
        "output_characters": sum(len(t) for t in texts),
        "tokenise_s": tokenised - start,
        "perturb_s": sampled - tokenised,
        "decode_s": decoded - sampled,
        "end_to_end_s": decoded - start,
        "ids": ids,
    }


def whole_corpus(space: EmbeddingSpace) -> dict:
    """All Shakespeare works through SanText, ``CORPUS_RUNS`` times (medians), then once by whole rows only."""
    works = shakespeare_works()
    mechanism = SanText(space, EPSILON, memory_cap_mb=MEMORY_CAP_MB)
    # the diameter and the proposal cover are computed (and cached per embedding) before the clock starts
    assert mechanism.guarantee.diameter is not None and len(mechanism.proposals.cover.centres) > 0
    runs = [corpus_pass(space, mechanism, works, seed) for seed in range(CORPUS_RUNS)]
    ids = runs[0].pop("ids")
    for run in runs[1:]:
        run.pop("ids")
    phases = {key: float(np.median([run[key] for run in runs])) for key in PHASES}
    start = time.perf_counter()
    mechanism.sample_by_rows(ids, make_generator(0))
    rows_only_s = time.perf_counter() - start
    tokens = len(ids)
    end_to_end = tokens / phases["end_to_end_s"]
    rows_only_end_to_end = tokens / (phases["tokenise_s"] + rows_only_s + phases["decode_s"])
    return {
        "runs": runs,
        "medians_of": CORPUS_RUNS,
        "works": len(works),
        "characters": sum(len(w.text) for w in works),
        "tokens": tokens,
        "distinct": int(torch.unique(ids).numel()),
        **phases,
        "perturb_tokens_per_s": tokens / phases["perturb_s"],
        "end_to_end_tokens_per_s": end_to_end,
        "rows_only_perturb_s": rows_only_s,
        "rows_only_end_to_end_tokens_per_s": rows_only_end_to_end,
        "perturb_speedup_vs_rows_only": rows_only_s / phases["perturb_s"],
        "end_to_end_speedup_vs_rows_only": end_to_end / rows_only_end_to_end,
    }


def main() -> None:
    rows, figures = [], {}
    for vocab, (n_tokens, prefix) in CASES.items():
        matrix = torch.randn(vocab, WIDTH, generator=torch.Generator().manual_seed(vocab))
        space = EmbeddingSpace.from_matrix(matrix, IdTokenizer(vocab), name=f"random{vocab}")
        figures[str(vocab)] = measure(space, zipf_tokens(vocab, n_tokens), prefix)
        rows.append([f"random {vocab}x{WIDTH}", *_row(figures[str(vocab)])])

    smollm2 = load_embedding("smollm2")
    text = "\n".join(p.read_text() for p in sorted(SEEDS_TEXT.glob("*.txt")))
    ids = smollm2.encode(text)[:4096]
    figures["smollm2_49152"] = measure(smollm2, ids, 96)
    rows.append(["smollm2 49152x576, real text", *_row(figures["smollm2_49152"])])

    corpus = whole_corpus(smollm2)
    custext = CusText(smollm2, EPSILON, top_k=20)
    custext_s = median_time(lambda: custext.sample(ids, make_generator(0)), repeats=3, warmup=1)
    start = time.perf_counter()
    largest_distance(smollm2, int(MEMORY_CAP_MB) << 20)
    diameter_s = time.perf_counter() - start
    start = time.perf_counter()
    greedy_cells(smollm2.points.to(torch.float32), 20, int(MEMORY_CAP_MB) << 20)
    partition_s = time.perf_counter() - start
    print_table(
        f"SanText, epsilon {EPSILON}, memory cap {MEMORY_CAP_MB:g} MB (medians; naive on a prefix)",
        ["embedding", "tokens", "distinct", "tokens/s", "naive tokens/s", "speedup", "peak growth MB"],
        rows,
    )
    print(
        f"\nCusText (k=20) on SmolLM2, real text: {len(ids) / custext_s:,.0f} tokens/s; "
        f"exact SmolLM2 diameter (pruned search): {diameter_s:.2f} s; CusText partition: {partition_s:.1f} s "
        "(both cached)"
    )
    print(
        f"whole corpus: {corpus['works']} works, {corpus['tokens']:,} tokens ({corpus['distinct']:,} distinct) through "
        f"SanText on SmolLM2 (medians of {CORPUS_RUNS} passes): {corpus['end_to_end_tokens_per_s']:,.0f} tokens/s "
        "end to end "
        f"(tokenise {corpus['tokenise_s']:.1f} s, perturb {corpus['perturb_s']:.1f} s = "
        f"{corpus['perturb_tokens_per_s']:,.0f} tokens/s, decode {corpus['decode_s']:.1f} s); whole rows only: "
        f"perturb {corpus['rows_only_perturb_s']:.1f} s, {corpus['rows_only_end_to_end_tokens_per_s']:,.0f} tokens/s "
        f"end to end (x{corpus['end_to_end_speedup_vs_rows_only']:.2f} end to end, "
        f"x{corpus['perturb_speedup_vs_rows_only']:.2f} perturb)"
    )

    cases = list(figures)
    write_results(
        "ldp",
        {
            "tokens_per_s": {k: figures[k]["tokens_per_s"] for k in cases},
            "naive_tokens_per_s": {k: figures[k]["naive_tokens_per_s"] for k in cases},
            "speedup_vs_naive": {k: figures[k]["speedup_vs_naive"] for k in cases},
            "peak_growth_mb": {k: figures[k]["peak_growth_mb"] for k in cases},
            "inputs": {k: {"tokens": figures[k]["tokens"], "distinct": figures[k]["distinct"]} for k in cases},
            "custext_smollm2_tokens_per_s": len(ids) / custext_s,
            "smollm2_diameter_s": diameter_s,
            "smollm2_custext_partition_s": partition_s,
            "whole_corpus_smollm2": corpus,
            "peak_rss_mb": peak_rss_mb(),
            "settings": {
                "epsilon": EPSILON,
                "width": WIDTH,
                "memory_cap_mb": MEMORY_CAP_MB,
                "input": "Zipf(1.2) ranks over a random permutation (random embeddings); "
                "the shared seed READMEs tokenised by SmolLM2 (real)",
            },
        },
    )


def _row(f: dict) -> list:
    growth = "-" if f["peak_growth_mb"] is None else f"{f['peak_growth_mb']:.0f}"
    return [
        f["tokens"],
        f["distinct"],
        f"{f['tokens_per_s']:,.0f}",
        f"{f['naive_tokens_per_s']:,.1f}",
        f"{f['speedup_vs_naive']:.1f}x",
        growth,
    ]


if __name__ == "__main__":
    main()
