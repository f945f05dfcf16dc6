"""Lightning attention vs causal softmax SDPA: same as `lightlong bench attention`.

python benchmarks/attention.py [--quick] [--device cuda] [...]
"""

import sys

from lightlong.cli import main

if __name__ == "__main__":
    main(["bench", "attention", *sys.argv[1:]])
