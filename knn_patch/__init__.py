"""knn_patch: kNN attention for pretrained HuggingFace causal LMs, patched in one call.

import knn_patch
model, tokenizer = knn_patch.load_default()   # embedded SmolLM2-135M-Instruct, offline
knn_patch.patch(model, k=32)                  # in place: every attention layer is kNN
knn_patch.unpatch(model)                      # back to the model's own attention
"""

__version__ = "0.2.0"

from .cache import KNNCache
from .calibration import calibrate
from .config import KNNConfig, resolve_k
from .loading import HubUnavailableError, load_default, load_model, load_tokenizer
from .patcher import (
    UnsupportedModelError,
    from_pretrained,
    get_config,
    is_patched,
    patch,
    patched,
    unpatch,
)
from .registry import available_backends, register_backend, registered_backend, unregister_backend

__all__ = [
    "HubUnavailableError",
    "KNNCache",
    "KNNConfig",
    "UnsupportedModelError",
    "available_backends",
    "calibrate",
    "from_pretrained",
    "get_config",
    "is_patched",
    "load_default",
    "load_model",
    "load_tokenizer",
    "patch",
    "patched",
    "register_backend",
    "registered_backend",
    "resolve_k",
    "unpatch",
    "unregister_backend",
]
