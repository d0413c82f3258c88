"""Fine-tune a causal LM under kNN attention: a recipe YAML in, a patched model out.

    python recipes/finetune.py --config recipes/configs/smollm2_knn_lora.yaml
    python recipes/finetune.py --config recipes/configs/smollm2_knn_lora.yaml --set train.lr=1e-4
    python recipes/finetune.py --config recipes/configs/smollm2_knn_lora.yaml --resume   # after a crash
    accelerate launch --config_file recipes/accelerate/ddp.yaml recipes/finetune.py \
        --config recipes/configs/smollm2_knn_full.yaml                                   # GPUs
    torchrun --standalone --nproc_per_node 2 recipes/finetune.py --config ...            # CPU processes

`knn-patch finetune --config ...` does the same. The data pipeline, the training loop, the
evaluation and the checkpoints live in `knn_patch.train.training`; the config keys are documented in
`knn_patch.train.recipe_config`.
"""

import argparse

from knn_patch.cli import user_errors
from knn_patch.train.training import add_arguments, run_from_args

if __name__ == "__main__":
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    with user_errors():
        run_from_args(parser.parse_args())
