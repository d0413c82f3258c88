"""Long-context perplexity with kNN attention, as an `evaluate` metric.

    import evaluate
    metric = evaluate.load("evals/metrics/knn_perplexity")
    metric.compute(predictions=texts, model_id="default", k=[16, "sqrt"], max_length=2048)

`predictions` are the texts (one document each). The model is `model_id` ("default" for the
embedded SmolLM2-135M-Instruct, a local folder or a hub id), or a `model` and `tokenizer` passed
directly. Dense attention and every k are scored on the same sliding windows by
`knn_patch.eval.evaluation.evaluate_perplexity`; this module only adapts its inputs and outputs.
"""

import datasets
import evaluate

from knn_patch import KNNConfig, load_model, load_tokenizer
from knn_patch.eval.evaluation import evaluate_perplexity

_DESCRIPTION = "Token-weighted sliding-window perplexity of a causal LM, dense and with kNN attention."
_KWARGS = """
Args:
    predictions (list of str): the documents.
    model_id (str): "default", a local folder or a hub id; ignored when `model` is given.
    model, tokenizer: an already loaded causal LM and its tokenizer.
    k (int, str or list): keys per query, or rules of n ("sqrt", "log", "n^0.125").
    backend (str): a knn_patch backend, "topk" by default.
    max_length (int), stride (int, default max_length), mode ("sliding" or "decode").
Returns:
    perplexity (dict): setting name ("dense", "topk k=16", ...) -> perplexity.
    ratio_to_dense (dict): setting name -> perplexity / dense perplexity.
    tokens (int): tokens scored (the same for every setting).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class KnnPerplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Haris, kNN Attention Demystified, arXiv 2411.04013 (2024).",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id="default", model=None, tokenizer=None, k=32, backend="topk",
                 max_length=2048, stride=None, mode="sliding"):  # fmt: skip
        model = model if model is not None else load_model(model_id)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_id)
        ids = tokenizer(list(predictions), add_special_tokens=False)["input_ids"]
        documents = [(str(i), doc) for i, doc in enumerate(ids) if len(doc) >= 2]
        configs = [KNNConfig(k=value, backend=backend) for value in (k if isinstance(k, list) else [k])]
        result = evaluate_perplexity(
            model,
            documents,
            configs,
            max_length=max_length,
            stride=stride or max_length,
            mode=mode,
            progress=False,
        )
        totals = result["totals"]
        return {
            "perplexity": {name: t["perplexity"] for name, t in totals.items()},
            "ratio_to_dense": {name: t["ratio_to_dense"] for name, t in totals.items()},
            "tokens": totals["dense"]["tokens"],
        }
