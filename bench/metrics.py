"""Text-metric throughput: the OOV pass (spaCy) and the diversity pass (numpy), synthetic corpus.

Builds a corpus of at least `--words` whitespace words from the project's story grammar,
tokenizes it (GPT-2's BPE by default, as GPT-Neo uses), writes Parquet shards to a temporary
folder, then times `build_lexicon` (on a tenth of the stories, standing in for the human
corpus), `count_oov` and `corpus_diversity`, and projects each to one paper-scale generation
(1,000,000 stories, ~600M tokens, converted to words with the measured tokens-per-word ratio).
`count_oov_shards` is timed on the same shards with 1 process and with `--processes` (twice:
the first call also starts the forkserver, the second reuses it), checked identical to
`count_oov`, and the speed-up printed.
There is no reference implementation of these metrics to race, so throughputs are absolute;
as a side-by-side, distinct-1..4 is also computed with a naive pure-Python `Counter` over the
same documents and compared with `distinct_n` on the same in-memory arrays.

    python bench/metrics.py                             # 10M words, one spaCy process
    python bench/metrics.py --words 2000000 --processes 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from collapse.corpus.parquet import documents, shard_name, shard_paths, write_shard
from collapse.corpus.synthetic import generate_stories, load_grammar
from collapse.metrics.diversity import corpus_diversity, distinct_n
from collapse.metrics.oov import build_lexicon, corpus_texts, count_oov, count_oov_shards
from collapse.tokenizer import gpt2_tokenizer, train_bpe_tokenizer

PAPER_TOKENS = 600_000_000  # one generation of the paper: 1,000,000 stories


def build_corpus(args: argparse.Namespace, root: Path):
    """Write shards of synthetic stories holding >= args.words words; return the tokenizer."""
    grammar = load_grammar()
    stories: list[str] = []
    words = chunk = 0
    while words < args.words:  # fixed-size chunks with their own seeds: extendable, repeatable
        batch = generate_stories(20_000, seed=args.seed + chunk, grammar=grammar)
        for text in batch:
            if words >= args.words:
                break
            stories.append(text)
            words += len(text.split())
        chunk += 1
    if args.tokenizer == "gpt2":
        tok = gpt2_tokenizer()
    else:
        tok = train_bpe_tokenizer(stories[:5000], vocab_size=args.vocab)
    for shard, start in enumerate(range(0, len(stories), args.shard_docs)):
        texts = stories[start : start + args.shard_docs]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        write_shard(root / shard_name(shard), ids, texts, [True] * len(texts))
    return tok, stories, words


def naive_distinct_n(docs: list[list[int]], n_max: int) -> dict[int, float]:
    """Distinct-n the obvious way: a Counter of n-gram tuples per n."""
    out = {}
    for n in range(1, n_max + 1):
        grams: Counter[tuple[int, ...]] = Counter()
        for doc in docs:
            grams.update(zip(*[doc[i:] for i in range(n)], strict=False))
        total = sum(grams.values())
        out[n] = len(grams) / total if total else 0.0
    return out


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=10_000_000, help="corpus size, words")
    parser.add_argument("--n-process", type=int, default=1, help="spaCy processes for OOV")
    parser.add_argument(
        "--processes", type=int, default=os.cpu_count() or 1, help="count_oov_shards workers"
    )
    parser.add_argument("--tokenizer", choices=["gpt2", "bpe"], default="gpt2")
    parser.add_argument("--vocab", type=int, default=4096, help="bpe only")
    parser.add_argument("--shard-docs", type=int, default=10_000, help="stories per shard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-naive", action="store_true", help="skip the Counter reference")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        root = Path(tmp)
        (tok, stories, words), t_build = _timed(build_corpus, args, root)
        paths = shard_paths(root)
        print(
            f"corpus: {len(stories):,} stories, {words:,} words, {len(paths)} shards "
            f"({args.tokenizer}, built in {t_build:.1f} s)"
        )

        human = stories[: max(1, len(stories) // 10)]
        human_words = sum(len(t.split()) for t in human)
        lexicon, t_lex = _timed(build_lexicon, human, 3, n_process=args.n_process)
        oov, t_oov = _timed(count_oov, corpus_texts(paths), lexicon, tok, n_process=args.n_process)
        tok_dir = root / "tokenizer"
        tok.save_pretrained(str(tok_dir))
        sharded = {}
        for label, processes in [("1", 1), ("cold", args.processes), ("warm", args.processes)]:
            sharded[label] = _timed(count_oov_shards, paths, lexicon, tok_dir, processes=processes)
            assert sharded[label][0] == oov, (label, sharded[label][0], oov)
        div, t_div = _timed(corpus_diversity, paths)
        tokens = div["tokens"]
        tokens_per_word = tokens / words
        paper_words = PAPER_TOKENS / tokens_per_word
        print(f"tokens: {tokens:,} ({tokens_per_word:.3f} tokens/word); lexicon {lexicon.size:,}")
        print(
            f"oov: {oov['occurrences']:,} non-words in {oov['words']:,} spaCy words, "
            f"rate {oov['rate_per_1000_words']:.3f}/1000; diversity: "
            + ", ".join(f"{k}={v:.4f}" for k, v in div.items() if isinstance(v, float))
        )
        rows = [
            ("build_lexicon", human_words, t_lex),
            (f"count_oov (n_process={args.n_process})", words, t_oov),
            ("count_oov_shards (processes=1)", words, sharded["1"][1]),
            (f"count_oov_shards (processes={args.processes})", words, sharded["cold"][1]),
            ("  same, forkserver warm", words, sharded["warm"][1]),
            ("corpus_diversity", words, t_div),
        ]
        print(f"{'pass':32s} {'words':>12s} {'seconds':>9s} {'words/s':>12s} {'paper gen':>10s}")
        for name, n_words, seconds in rows:
            rate = n_words / seconds
            print(
                f"{name:32s} {n_words:>12,} {seconds:>9.2f} {rate:>12,.0f} "
                f"{paper_words / rate / 60:>8.1f} min"
            )
        print(f"(paper generation: {PAPER_TOKENS:,} tokens = {paper_words:,.0f} words)")
        t_one = sharded["1"][1]
        print(
            f"count_oov_shards: {args.processes} processes vs 1 on {len(paths)} shards "
            f"({os.cpu_count()} CPUs): speed-up {t_one / sharded['cold'][1]:.2f}x "
            f"(incl. forkserver start), {t_one / sharded['warm'][1]:.2f}x (warm); "
            "results identical to count_oov"
        )

        if not args.skip_naive:
            docs = list(documents(paths))
            flat = np.fromiter((t for d in docs for t in d), dtype=np.int32, count=tokens)
            offsets = np.zeros(len(docs) + 1, dtype=np.int64)
            np.cumsum([len(d) for d in docs], out=offsets[1:])
            ours, t_ours = _timed(distinct_n, flat, offsets, 4)
            naive, t_naive = _timed(naive_distinct_n, docs, 4)
            assert all(abs(ours[n] - naive[n]) < 1e-12 for n in ours), (ours, naive)
            print(
                f"distinct-1..4 in memory: naive Counter {t_naive:.2f} s, distinct_n "
                f"{t_ours:.2f} s, speed-up {t_naive / t_ours:.1f}x (results identical)"
            )


if __name__ == "__main__":
    main()
