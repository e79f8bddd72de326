"""ULT codec throughput against the original algorithm, and compression per patch size.

The reference below re-implements what the original ULT code does, in the same straightforward
Python: per patch, a sentinel character appended and all rotations sorted; RLE runs as
``count+char`` strings; the inverse BWT by prepending the column and sorting n times; a table
rebuilt (re-sorted and re-indexed) after every instance (here: every line) while counting; encode
lookups by bisection. It is far too slow for the whole corpus, so it runs on a slice and is
scaled per MB. It also shows the original's defect: it does not round-trip text holding
characters below its sentinel (newline, tab).

Figures: encode/decode MB/s (UTF-8 MB of the Shakespeare corpus, keyed tokenizer, patch 8; encode
returns and decode takes Python lists of ids), table-build seconds, the same for the reference,
speed-up ratios, and symbols per character for patch sizes 4, 8, 10, 16. Encode and decode are
timed twice: wall time, and this process's CPU time, which other jobs on a shared machine disturb
less; both ratios compare like with like.
"""

from __future__ import annotations

import bisect
import time

from bench.harness import median_time, peak_rss_mb, print_table, write_results
from privtune.common.corpus import shakespeare_works
from privtune.common.ult import UltConfig, UltKey, UltTokenizer, bind_key, build_table

PATCH_SIZES = (4, 8, 10, 16)
REFERENCE_SLICE_CHARS = 40_000
SENTINEL = "\u001d"
RUN_SEP = "\u001f"


class ReferenceULT:
    """The original algorithm, straightforwardly (see module docstring)."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size
        self.occurrences: dict[str, int] = {}
        self.lut: dict[str, str] = {}
        self.keys: list[str] = []
        self.inverse: dict[str, str] = {}

    @staticmethod
    def bwt_runs(patch: str) -> list[str]:
        rotations = sorted(patch[i:] + SENTINEL + patch[:i] for i in range(len(patch) + 1))
        column = "".join(r[-1] for r in rotations)
        runs, count = [], 1
        for a, b in zip(column, column[1:]):
            if a == b:
                count += 1
            else:
                runs.append(f"{count}{a}")
                count = 1
        runs.append(f"{count}{column[-1]}")
        return runs

    @staticmethod
    def inverse_bwt(runs: list[str]) -> str:
        column = "".join(run[-1] * int(run[:-1]) for run in runs)
        rows = [""] * len(column)
        for _ in column:
            rows = sorted(c + row for c, row in zip(column, rows))
        return rows[0][1:]

    def compress(self, text: str) -> list[list[str]]:
        return [self.bwt_runs(text[i : i + self.patch_size]) for i in range(0, len(text), self.patch_size)]

    def add_instance(self, text: str) -> None:
        for patch in self.compress(text):
            for run in patch:
                self.occurrences[run] = self.occurrences.get(run, 0) + 1
        self._rebuild()

    def _rebuild(self) -> None:
        ranked = sorted(self.occurrences, key=self.occurrences.__getitem__, reverse=True)
        self.lut = dict(sorted((run, chr(0x100 + rank)) for rank, run in enumerate(ranked)))
        self.keys = list(self.lut)
        self.inverse = {v: k for k, v in self.lut.items()}

    def encode(self, text: str) -> str:
        def lookup(run: str) -> str:  # unseen runs silently become a neighbour
            at = min(bisect.bisect_left(self.keys, run), len(self.keys) - 1)
            return self.lut[self.keys[at]]

        return RUN_SEP.join("".join(lookup(run) for run in patch) for patch in self.compress(text))

    def decode(self, encoded: str) -> str:
        return "".join(self.inverse_bwt([self.inverse[c] for c in patch]) for patch in encoded.split(RUN_SEP) if patch)


def main() -> None:
    texts = [doc.text for doc in shakespeare_works()]
    corpus_mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    chars = sum(len(t) for t in texts)
    print(f"corpus: {len(texts)} works, {corpus_mb:.2f} MB, {chars} characters")

    config = UltConfig(patch_size=8)
    build_s = median_time(lambda: build_table(texts, config), repeats=3)
    key = UltKey(bytes(range(32)))
    table = build_table(texts, config)
    tokenizer = UltTokenizer(bind_key(table, key), key)
    encoded = tokenizer.encode_batch(texts)
    assert tokenizer.decode_batch(encoded, strict=True) == texts

    sample = "".join(texts)[:REFERENCE_SLICE_CHARS]
    sample_mb = len(sample.encode("utf-8")) / 1e6
    lines = sample.splitlines(keepends=True)
    reference = ReferenceULT(8)
    start = time.perf_counter()
    for line in lines:
        reference.add_instance(line)
    ref_build_s_per_mb = (time.perf_counter() - start) / sample_mb
    ref_encoded = reference.encode(sample)
    ref_round_trip = reference.decode(ref_encoded) == sample

    timed: dict[str, dict[str, float]] = {}
    for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
        timed[clock_name] = {
            "encode_s": median_time(lambda: tokenizer.encode_batch(texts), repeats=5, clock=clock),
            "decode_s": median_time(lambda: tokenizer.decode_batch(encoded), repeats=5, clock=clock),
            "ref_encode_s_per_mb": median_time(lambda: reference.encode(sample), 3, 0, clock) / sample_mb,
            "ref_decode_s_per_mb": median_time(lambda: reference.decode(ref_encoded), 3, 0, clock) / sample_mb,
        }
    wall, cpu = timed["wall"], timed["cpu"]
    encode_s, decode_s = wall["encode_s"], wall["decode_s"]
    ref_encode_s, ref_decode_s = wall["ref_encode_s_per_mb"], wall["ref_decode_s_per_mb"]

    symbols_per_char, distinct = {}, {}
    for size in PATCH_SIZES:
        sized = UltTokenizer(build_table(texts, UltConfig(patch_size=size)))
        symbols_per_char[str(size)] = sum(map(len, sized.encode_batch(texts))) / chars
        distinct[str(size)] = len(sized.table.symbols)

    figures = {
        "corpus_mb": corpus_mb,
        "encode_mb_s": corpus_mb / encode_s,
        "decode_mb_s": corpus_mb / decode_s,
        "table_build_s": build_s,
        "table_build_mb_s": corpus_mb / build_s,
        "reference_slice_mb": sample_mb,
        "reference_encode_mb_s": 1 / ref_encode_s,
        "reference_decode_mb_s": 1 / ref_decode_s,
        "reference_table_build_s_per_mb": ref_build_s_per_mb,
        "reference_round_trip_ok": ref_round_trip,
        "speedup_vs_reference_encode": ref_encode_s * corpus_mb / encode_s,
        "speedup_vs_reference_decode": ref_decode_s * corpus_mb / decode_s,
        "speedup_vs_reference_table_build": ref_build_s_per_mb * corpus_mb / build_s,
        "encode_mb_s_cpu": corpus_mb / cpu["encode_s"],
        "decode_mb_s_cpu": corpus_mb / cpu["decode_s"],
        "reference_encode_mb_s_cpu": 1 / cpu["ref_encode_s_per_mb"],
        "reference_decode_mb_s_cpu": 1 / cpu["ref_decode_s_per_mb"],
        "speedup_vs_reference_encode_cpu": cpu["ref_encode_s_per_mb"] * corpus_mb / cpu["encode_s"],
        "speedup_vs_reference_decode_cpu": cpu["ref_decode_s_per_mb"] * corpus_mb / cpu["decode_s"],
        "symbols_per_char": symbols_per_char,
        "distinct_symbols": distinct,
        "peak_rss_mb": peak_rss_mb(),
    }
    print_table(
        "ULT throughput (MB/s of UTF-8 text; reference = original algorithm on a slice, scaled)",
        ["stage", "privtune", "reference", "speed-up"],
        [
            [
                "encode MB/s",
                figures["encode_mb_s"],
                figures["reference_encode_mb_s"],
                figures["speedup_vs_reference_encode"],
            ],
            [
                "decode MB/s",
                figures["decode_mb_s"],
                figures["reference_decode_mb_s"],
                figures["speedup_vs_reference_decode"],
            ],
            [
                "encode MB/s (CPU time)",
                figures["encode_mb_s_cpu"],
                figures["reference_encode_mb_s_cpu"],
                figures["speedup_vs_reference_encode_cpu"],
            ],
            [
                "decode MB/s (CPU time)",
                figures["decode_mb_s_cpu"],
                figures["reference_decode_mb_s_cpu"],
                figures["speedup_vs_reference_decode_cpu"],
            ],
            [
                "table build MB/s",
                figures["table_build_mb_s"],
                1 / ref_build_s_per_mb,
                figures["speedup_vs_reference_table_build"],
            ],
        ],
    )
    print_table(
        "symbols per character",
        ["patch size", "symbols/char", "distinct symbols"],
        [[s, symbols_per_char[s], distinct[s]] for s in symbols_per_char],
    )
    print(f"\nreference round-trips its slice: {ref_round_trip} (newlines sort below its sentinel)")
    write_results("ult", figures)


if __name__ == "__main__":
    main()
