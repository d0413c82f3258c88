"""Extras: `pip install knn-patch` patches with every backend and KNNCache; a module that needs an extra
fails with one line naming it; pyproject.toml, the lock and `knn_patch.extras.EXTRAS` agree."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from knn_patch import extras
from knn_patch.extras import EXTRAS, require

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+

# Run first in a child process: the packages of the extras are not found, as if not installed. Every
# finder is wrapped (rather than one put in front that raises) so that availability probes such as
# transformers' `importlib.util.find_spec("rich")` get None, as they would without the package.
BLOCK = """
import sys
BLOCKED = {blocked!r}
class NotInstalled:
    def __init__(self, finder):
        self.finder = finder
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return self.finder.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.finder, attr)
sys.meta_path[:] = [NotInstalled(f) for f in sys.meta_path]
"""


def run_without(blocked, body):
    code = BLOCK.format(blocked=set(blocked)) + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_core_patches_with_every_backend_and_caches_without_any_extra():
    proc = run_without(
        EXTRAS,
        """
        import torch
        from tiny_models import tiny_model

        import knn_patch

        model = tiny_model("llama")
        ids = torch.arange(40).view(1, 40) % 120 + 3
        options = {"faiss": {"index": "flat", "block_size": 8, "sync_every": 8}}
        with torch.no_grad():
            for backend in knn_patch.available_backends():
                with knn_patch.patched(model, k=4, backend=backend, backend_options=options.get(backend, {})):
                    assert torch.isfinite(model(ids).logits).all(), backend
            with knn_patch.patched(model, k=4, backend="faiss", backend_options=options["faiss"]):
                cache = knn_patch.KNNCache()
                out = model.generate(ids, cache=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 44) and cache.index_memory_bytes() > 0
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not leaked, leaked
        print(sorted(knn_patch.available_backends()))
        """,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "['faiss', 'gumbel', 'tail', 'topk']"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("knn_patch.eval.data", "datasets", "eval"), ("knn_patch.train.training", "peft", "train")],
)
def test_a_missing_extra_fails_with_one_line_naming_it(module, blocked, extra):
    body = f"""
        import {module}
        if {blocked!r} == "peft":  # imported on first use, by LoRA
            {module}.apply_lora(None, None)
        """
    proc = run_without([blocked], body)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"ImportError: knn-patch [a-zA-Z -]+ needs the '{extra}' extra \({blocked} is missing\): "
        rf"pip install 'knn-patch\[{extra}\]'",
        last,
    ), last
    assert "During handling" not in proc.stderr  # no chained ModuleNotFoundError


def test_require_names_the_extra_and_passes_a_broken_install_through(tmp_path, monkeypatch):
    (tmp_path / "knn_fake_extra").mkdir()
    (tmp_path / "knn_fake_extra" / "__init__.py").write_text("import knn_fake_dependency_of_it\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.EXTRAS, "knn_fake_extra", "eval")
    monkeypatch.setitem(extras.EXTRAS, "knn_fake_absent", "train")
    with pytest.raises(ImportError, match=r"^knn-patch plots needs the 'train' extra .*knn-patch\[train\]'$"):
        require("knn_fake_absent.sub", "plots")
    with pytest.raises(ModuleNotFoundError) as info:  # installed, but broken: its own error
        require("knn_fake_extra", "plots")
    assert info.value.name == "knn_fake_dependency_of_it"


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower().replace("_", "-")


def test_pyproject_extras_and_lock_agree():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    core = {_name(r) for r in project["dependencies"]}
    for module, extra in EXTRAS.items():
        assert module not in core, f"{module} is a core dependency, not the {extra!r} extra's"
        assert module in {_name(r) for r in optional[extra]}, f"the {extra!r} extra does not list {module}"
    assert "faiss-cpu" in core, "every backend, faiss included, comes with the plain install"
    assert set(optional["all"]) == {"knn-patch[eval,train]"} and "knn-patch[all]" in optional["dev"]
    assert "knn-patch[eval]" in optional["train"], "fine-tuning evaluates as it trains"
    locked = {
        _name(line)
        for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
        if line[:1].isalnum()
    }
    wanted = core | {_name(r) for reqs in optional.values() for r in reqs if not r.startswith("knn-patch")}
    assert wanted <= locked, sorted(wanted - locked)
