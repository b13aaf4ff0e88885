"""One rank of `bench.rank_memory`: `unisd ARGS...`, then this process's peak RSS as one `RSS {json}` line on stderr."""
from __future__ import annotations

import json
import os
import resource
import sys

from unisd.cli import main

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except SystemExit as e:
        if e.code:
            raise
    print("RSS " + json.dumps({"rank": int(os.environ.get("RANK", "0")),
                               "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}),
          file=sys.stderr)
