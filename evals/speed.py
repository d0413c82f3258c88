"""Attention speed/memory benchmark: top-k kernel vs SDPA vs eager, for one SmolLM2-shaped layer.

    python evals/speed.py --n 1024 2048 4096 8192 16384      # same as `knn-patch bench ...`

Prints a table and writes <out>/speed.json and <out>/speed.png. See knn_patch/bench.py for what is
measured and how.
"""

from knn_patch.bench.kernel import main

if __name__ == "__main__":
    main()
