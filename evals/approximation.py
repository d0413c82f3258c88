"""The approximation report (same as `knn-patch approx ...`): the paper's synthetic experiment, real
activations of the embedded model, sampled gradients, and perplexity at equal key budgets.

    python evals/approximation.py --out outputs/approx                 # default sizes
    python evals/approximation.py --size quick --parts synthetic,gradients
"""

import sys

from knn_patch.cli import main

if __name__ == "__main__":
    main(["approx", *sys.argv[1:]])
