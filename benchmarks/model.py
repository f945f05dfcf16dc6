"""The whole model, lightlong vs transformers: same as `lightlong bench model`.

python benchmarks/model.py [--preset small] [--lengths ...] [...]
"""

import sys

from lightlong.cli import main

if __name__ == "__main__":
    main(["bench", "model", *sys.argv[1:]])
