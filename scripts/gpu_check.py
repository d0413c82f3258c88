"""Check knn_patch on a CUDA GPU in one command: `make gpu-check`, or `python3 scripts/gpu_check.py`.

GPU machines are lent rarely and for minutes, so the check is prepared here and costs no device time
to write (docs/benchmarks.md, "GPU check: how to run it"). Without CUDA it says so in one line and
exits 0, so it runs anywhere. With CUDA, within 7.5 minutes (the sum of its step limits), it

1. installs this checkout into the running python, offline: `pip install --no-deps -e .` (the device
   image already holds every module that the tests and the bench import, so no wheels travel);
2. runs the CUDA tests: tests/test_cuda.py, and test_faiss.py's CUDA test (skipped without faiss);
3. benchmarks one attention layer with `knn-patch bench` on the GPU: topk, tail, SDPA (and eager
   where it fits) at n = 4k, 16k and 64k, forward and forward+backward, with peak memory;
4. prints one summary table, in Markdown for docs/benchmarks.md, and exits 1 if a test failed or
   errored, or if the tests or the bench did not finish.

It writes to $OUT when set (the device tool brings that folder back), else outputs/gpu_check:
install.log, pytest.log, pytest.xml, bench.log (the bench's table), speed.json and speed.png (as
`knn-patch bench` writes them), and summary.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# test_faiss.py's CUDA test too (that file is skipped without faiss): `-k cuda` selects it and all
# of test_cuda.py (a node id would be an error where the file is skipped)
TESTS = ["tests/test_cuda.py", "tests/test_faiss.py", "-k", "cuda"]
# gumbel is skipped (--max-sampled-n 0): it ran at 8-85x topk's time on CPU (docs/benchmarks.md), and
# minutes on a lent GPU are few. eager keeps the bench's 8 GB limit, so it runs at 4k only.
BENCH_ARGS = ["--device", "cuda", "--n", "4096", "16384", "65536", "--repeats", "2", "--max-sampled-n", "0"]
# `knn-patch bench` without the CLI: knn_patch.cli imports datasets and evaluate, which the device lacks
BENCH = "import sys; from knn_patch.bench.kernel import main; main(sys.argv[1:])"
SHOWN = ("topk", "tail", "sdpa", "eager")
# Per-step limits: 7.5 minutes in all, inside the device tool's 10-minute command limit.
TIMEOUT_S = {"install": 60, "tests": 120, "bench": 270}


def no_gpu_reason() -> str | None:
    """Why this python cannot run the check, or None when torch sees a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return f"{sys.executable} cannot import torch"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA GPU"
    return None


def step(name: str, cmd: list[str], log: Path) -> tuple[int | None, float]:
    """Run one step from the repo root, its output into `log`; (exit status or None on timeout, seconds)."""
    print(f"gpu-check: {name} ({' '.join(cmd[1:])}) ...", flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=TIMEOUT_S[name]
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
            f.write(f"\ngpu-check: {name} stopped after {TIMEOUT_S[name]} s\n")
    return rc, time.perf_counter() - t0


def pytest_counts(xml: Path) -> dict[str, int] | None:
    """passed/failed/errors/skipped from pytest's JUnit XML, or None where pytest wrote none."""
    if not xml.exists():
        return None
    suite = ET.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    n = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    return {"passed": passed, "failed": n["failures"], "errors": n["errors"], "skipped": n["skipped"]}


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def fmt_bytes(b: int | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def describe(rc: int | None, seconds: float, ok: str) -> str:
    """A step's result for the summary: `ok` on exit 0, else its exit status or the timeout."""
    done = "timed out" if rc is None else ok if rc == 0 else f"exit {rc}"
    return f"{done} ({seconds:.0f} s)"


def bench_table(speed: dict) -> list[str]:
    """Markdown rows, one per (n, method), each with its time relative to SDPA's."""
    lines = [
        "| n | method | fwd | fwd+bwd | peak mem (fwd+bwd) | fwd / sdpa | fwd+bwd / sdpa |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in speed["rows"]:
        sdpa = row["methods"]["sdpa"]
        for name in SHOWN:
            r = row["methods"][name]
            if "skipped" in r:
                lines.append(f"| {row['n']} | {name} | skipped: {r['skipped']} | | | | |")
                continue
            ratios = [
                f"{r[m] / sdpa[m]:.2f}×" if r.get(m) and sdpa.get(m) else "-" for m in ("fwd_s", "fwd_bwd_s")
            ]
            cells = [fmt_time(r["fwd_s"]), fmt_time(r["fwd_bwd_s"]), fmt_bytes(r["peak_bytes"]), *ratios]
            lines.append(f"| {row['n']} | {name} | {' | '.join(cells)} |")
    return lines


def main() -> int:
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: no GPU here ({reason}); nothing checked.")
        return 0
    import torch
    import transformers

    out = Path(os.environ.get("OUT") or ROOT / "outputs" / "gpu_check").resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    # --no-build-isolation and --no-index: the device cannot reach a registry, not even for setuptools
    install = [py, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    install_rc, install_s = step("install", install, out / "install.log")
    pytest_cmd = [py, "-m", "pytest", "-q", "-rs", *TESTS, f"--junitxml={out / 'pytest.xml'}"]
    tests_rc, tests_s = step("tests", pytest_cmd, out / "pytest.log")
    bench_rc, bench_s = step("bench", [py, "-c", BENCH, *BENCH_ARGS, "--out", str(out)], out / "bench.log")
    for log in ("pytest.log", "bench.log"):
        print((out / log).read_text(), flush=True)

    counts = pytest_counts(out / "pytest.xml") if tests_rc is not None else None
    speed = json.loads((out / "speed.json").read_text()) if bench_rc == 0 else None
    failures = (["tests"] if tests_rc != 0 or counts is None else []) + (["bench"] if speed is None else [])

    # A failed install does not stop the check: `python -m` and `python -c` put the repo root (their
    # working directory) first on sys.path, so the steps import knn_patch from the checkout anyway.
    installed = describe(install_rc, install_s, "ok") + ("" if install_rc == 0 else ", ran from the checkout")
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tests = "did not finish" if counts is None else ", ".join(f"{v} {k}" for k, v in counts.items())
    lines = [
        f"GPU check, {when}: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}",
        "",
        "| step | result |",
        "|---|---|",
        f"| install (`pip install --no-deps -e .`) | {installed} |",
        f"| tests (`pytest {' '.join(TESTS)}`) | {tests}; {describe(tests_rc, tests_s, 'exit 0')} |",
        f"| bench (`knn-patch bench {' '.join(BENCH_ARGS)}`) | {describe(bench_rc, bench_s, 'ok')} |",
        "",
        *(bench_table(speed) if speed else ["no bench rows: see bench.log"]),
        "",
        f"gpu-check: {'FAILED: ' + ', '.join(failures) if failures else 'passed'}; files in {out}",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
