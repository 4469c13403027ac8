"""Token-table inserts (char CNN + highway + projection + the first layer's input gates of new tokens) by call size.

    python benchmarks/bench_inserts.py --sentences heldout.txt --tokens 16384 --sizes 256,1024 256,512 512

One Embedder (built-in model unless --options/--weights), one table; each candidate ``embed.INSERT_SIZES["short"]``
writes the same new tokens into it, the candidates alternating round after round in this one process (each compiled
before the first timed round), so the machine's drift falls on all alike. Prints one JSON line: seconds per round for
each candidate, and microseconds a token for the best round.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from elmo_jax import embed
from elmo_jax.embed import Embedder
from elmo_jax.embed_cli import reuse_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", required=True, help="whitespace-tokenized text, one sentence a line")
    parser.add_argument("--tokens", type=int, default=16384, help="distinct tokens inserted a round")
    parser.add_argument("--sizes", nargs="+", default=["256,1024", "256,512"],
                        help="candidate short-token call sizes, each ascending and comma-separated")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--options", help="options.json (with --weights); default: the built-in model")
    parser.add_argument("--weights")
    parser.add_argument("--cli-malloc", action="store_true",
                        help="first set the C allocator as `elmo-jax embed` does (embed_cli.reuse_freed_memory)")
    args = parser.parse_args()
    if args.cli_malloc:
        reuse_freed_memory(trim_every=None)

    candidates = [tuple(int(n) for n in sizes.split(",")) for sizes in args.sizes]
    embedder = Embedder(args.options, args.weights)
    with open(args.sentences, encoding="utf-8") as f:
        words = sorted({word for line in f for word in line.split()})[: args.tokens]
    table = embedder._new_table(embedder._capacity)
    rows = np.arange(2, 2 + len(words))
    long_sizes = embed.INSERT_SIZES["long"]

    def insert(sizes) -> float:
        nonlocal table
        embed.INSERT_SIZES = {"short": sizes, "long": long_sizes}
        start = time.perf_counter()
        table = embedder._fill(table, rows, words)
        jax.block_until_ready(table)
        return time.perf_counter() - start

    for sizes in candidates:  # compile each candidate's programs before timing any
        insert(sizes)
    seconds = {sizes: [] for sizes in candidates}
    for _ in range(args.rounds):
        for sizes in candidates:
            seconds[sizes].append(round(insert(sizes), 4))
    print(json.dumps({
        "what": "token-table inserts by short-token call size", "tokens": len(words), "rounds": args.rounds,
        "cli_malloc": args.cli_malloc,
        "seconds": {",".join(map(str, s)): v for s, v in seconds.items()},
        "best_us_per_token": {",".join(map(str, s)): round(min(v) / len(words) * 1e6, 1) for s, v in seconds.items()},
    }))


if __name__ == "__main__":
    main()
