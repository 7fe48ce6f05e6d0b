"""Regenerate the miniature retriever (examples/assets/repllama-smol/): an entry point to examples/make_retriever.py.

    nice -n 10 python bench/make_retriever.py [--max-steps N] [--out DIR] ...    (same options as the example)

The code lives in one place, `examples.make_retriever`; this file only makes it reachable from bench/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples.make_retriever import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
