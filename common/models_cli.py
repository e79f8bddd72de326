"""``privtune models``: load (and on first use convert) a model source and describe it."""

from __future__ import annotations

import argparse
import time

from privtune.common.families import num_blocks


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="smollm2 | tiny-gpt2 | tiny-llama | tiny-opt | a Hugging Face folder | a hub id")
    parser.add_argument("--prompt", default="", help="also greedily continue this prompt")
    parser.add_argument("--max-new-tokens", type=int, default=20)


def run(args: argparse.Namespace) -> int:
    import torch

    from privtune.common.models import load_model

    start = time.perf_counter()
    loaded = load_model(args.source)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in loaded.model.parameters())
    print(f"source      {loaded.source}\nfamily      {loaded.family.name}\nblocks      {num_blocks(loaded.model)}")
    print(f"parameters  {params / 1e6:.1f} M\nvocabulary  {loaded.tokenizer.vocab_size}\nload time   {seconds:.2f} s")
    if args.prompt:
        ids = torch.tensor([loaded.tokenizer.encode(args.prompt)])
        with torch.no_grad():
            # a transformers method, typed as a tensor by nn.Module.__getattr__
            out = loaded.model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)  # type: ignore[operator]
        print("continuation", repr(loaded.tokenizer.decode(out[0, ids.shape[1] :].tolist())))
    return 0
