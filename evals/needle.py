"""Needle-in-a-haystack retrieval, dense against kNN on the same prompts (same as `knn-patch needle ...`).

    python evals/needle.py --task multikey --lengths 2048,4096 --trials 8 \
        --settings evals/configs/needle.yaml --out outputs/needle_smollm2
    python evals/needle.py --model gemma3-270m --lengths 4096,8192 --settings evals/configs/needle.yaml
"""

import sys

from knn_patch.cli import main, user_errors

if __name__ == "__main__":
    with user_errors():
        main(["needle", *sys.argv[1:]])
