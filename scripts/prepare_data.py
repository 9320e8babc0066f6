"""Build (or reuse) the token cache of a corpus; the last line of stdout is a JSON summary.

python scripts/prepare_data.py [--corpus auto|wikitext2|wiki-summaries|text:PATH] [--cache DIR]
"""

import argparse
import json
import sys
import time
from pathlib import Path

from plasa_lab.data import corpora
from plasa_lab.data.tokens import CorpusError
from plasa_lab.settings import cache_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--corpus",
        default="auto",
        help="auto (default: wikitext2 if the hub answers, else wiki-summaries), "
        "wikitext2, wiki-summaries, or text:PATH (a file or a folder of .txt files)",
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"cache root (default: $PLASA_CACHE or {cache_root()})"
    )
    args = parser.parse_args(argv)

    t0 = time.time()
    try:
        corpus = corpora.prepare_corpus(args.corpus, cache_root=args.cache)
    except (CorpusError, ValueError, OSError) as e:
        print(f"prepare_data: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    print(json.dumps({**corpus.summary(), "cache": str(corpus.dir), "seconds": round(time.time() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
