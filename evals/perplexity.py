"""Long-context perplexity, dense against kNN on the same windows (same as `knn-patch eval ...`).

    python evals/perplexity.py --dataset bundled --min-tokens 4096 --max-tokens 4096 --max-docs 20 \
        --max-length 4096 --k 2,4,8,16,32,64,128,256,n^0.125,n^0.25,sqrt
    torchrun --standalone --nproc_per_node 2 evals/perplexity.py ...    # documents sharded over processes
"""

import sys

from knn_patch.cli import main, user_errors

if __name__ == "__main__":
    with user_errors():
        main(["eval", *sys.argv[1:]])
