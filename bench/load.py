"""Time and peak memory of loading each model source, cold (first use) and cached.

Each load runs in a fresh subprocess so that peak RSS belongs to that load alone and no import or
file cache of an earlier load inside the same interpreter flatters the figure. "Cold" for SmolLM2
means the GGUF file is de-quantised and converted (empty privtune cache); "cached" loads the
converted safetensors. Importing torch/transformers (a few seconds, paid once per process whatever
the source) is timed separately as ``import_s``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench.harness import print_table, write_results

PROBE = """
import json, resource, time
t0 = time.perf_counter()
from privtune.common.models import load_model
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel, LlamaForCausalLM, OPTForCausalLM
t1 = time.perf_counter()
load_model({source!r})
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "load_s": t2 - t1,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def probe(source: str, cache: str) -> dict:
    env = dict(os.environ, PRIVTUNE_CACHE=cache)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(source=source)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    repeats = 3
    figures: dict = {}
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        cold = probe("smollm2", cache)
        cached = [probe("smollm2", cache) for _ in range(repeats)]
        figures["smollm2"] = {
            "cold_s": cold["load_s"],
            "cached_s": statistics.median(r["load_s"] for r in cached),
            "peak_rss_mb": max(cold["peak_rss_mb"], *(r["peak_rss_mb"] for r in cached)),
            "peak_rss_mb_cold": cold["peak_rss_mb"],
            "peak_rss_mb_cached": statistics.median(r["peak_rss_mb"] for r in cached),
            "import_s": statistics.median(r["import_s"] for r in cached),
            "cold_vs_cached_ratio": cold["load_s"] / statistics.median(r["load_s"] for r in cached),
        }
        rows.append(["smollm2", "cold (convert GGUF)", cold["load_s"], cold["peak_rss_mb"]])
        rows.append(
            [
                "smollm2",
                f"cached (median of {repeats})",
                figures["smollm2"]["cached_s"],
                figures["smollm2"]["peak_rss_mb_cached"],
            ]
        )
        for source in ("tiny-gpt2", "tiny-llama", "tiny-opt"):
            runs = [probe(source, cache) for _ in range(repeats)]
            figures[source] = {
                "load_s": statistics.median(r["load_s"] for r in runs),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
            }
            rows.append(
                [source, f"in process (median of {repeats})", figures[source]["load_s"], figures[source]["peak_rss_mb"]]
            )
    print_table("model loading (load_model only; imports excluded)", ["source", "case", "seconds", "peak RSS MB"], rows)
    write_results("load", figures)


if __name__ == "__main__":
    main()
