"""Run fast-transformers' own tests against transformer_core (import prefix swapped).

Exports the seed's ``tests/`` from its git repository into a temporary directory,
rewrites ``fast_transformers`` -> ``transformer_core``, runs pytest on the parts
transformer_core re-implements and prints pass / fail / skip per file and totals.
Files that need CUDA (``*_gpu.py``, ``*_cuda.py``) or the seed's compiled kernels
(``causal_product``, ``clustering``, ``hashing``, ``local_product``,
``sparse_product``, ``aggregate``) are not run; the script lists them.

Usage::

    python bench/seed_suite.py --seed-git /work/.mirror/idiap+fast-transformers/repo
    python bench/seed_suite.py --seed-git ... --only attention test_builders.py -k topk

Exit status 0 when every test that ran passed.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

TARGETS = [
    "events", "attention", "recurrent", "feature_maps", "test_builders.py", "test_masking.py",
    "test_transformer_encoder.py", "test_transformer_decoder.py", "test_weight_mapper.py",
]
KERNEL_MODULES = ("causal_product", "clustering", "hashing", "local_product", "sparse_product",
                  "aggregate")
KERNEL_IMPORT = re.compile(rf"fast_transformers\.({'|'.join(KERNEL_MODULES)})\b")


def export_tests(seed_git: str, revision: str, into: Path) -> None:
    """Write the seed's ``tests/`` at ``revision`` under ``into``."""
    archive = subprocess.run(["git", f"--git-dir={seed_git}", "archive", revision, "tests"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")


def skip_reason(path: Path) -> str | None:
    """Why a seed test file is not run here, or None."""
    if re.search(r"_(gpu|cuda)\.py$", path.name):
        return "needs CUDA"
    if KERNEL_IMPORT.search(path.read_text()):
        return "needs the seed's compiled kernels"
    return None


def prepare(root: Path, targets: list[str]) -> tuple[list[Path], dict[str, str]]:
    """Swap the import prefix in every file; return the files to run and those skipped."""
    for path in root.rglob("*.py"):
        text = path.read_text()
        skipped = skip_reason(path)  # decided on the seed's own imports
        path.write_text(text.replace("fast_transformers", "transformer_core"))
        if skipped:
            path.with_suffix(".skip").write_text(skipped)
    run, skipped = [], {}
    for target in targets:
        base = root / "tests" / target
        files = [base] if base.is_file() else sorted(base.rglob("test_*.py"))
        for path in files:
            reason = path.with_suffix(".skip")
            if reason.exists():
                skipped[str(path.relative_to(root / "tests"))] = reason.read_text()
            else:
                run.append(path)
    (root / "pytest.ini").write_text("[pytest]\njunit_family = xunit1\n")
    return run, skipped


def summarise(junit: Path, root: Path) -> dict[str, dict[str, list[str]]]:
    """{file: {"passed"|"failed"|"skipped": [test names or failure lines]}} from junit xml."""
    results: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}.{case.get('name')}"
        file = case.get("file") or case.get("classname", "").replace(".", "/")
        file = file.removeprefix("tests/")
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").splitlines()[0][:160] if problem.get(
                "message") else ""
            results[file]["failed"].append(f"{name}: {message}")
        elif case.find("skipped") is not None:
            reason = (case.find("skipped").get("message") or "").splitlines()[0][:80]
            results[file]["skipped"].append(reason)
        else:
            results[file]["passed"].append(name)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-git", required=True, help="the seed's bare git directory")
    parser.add_argument("--revision", default="HEAD")
    parser.add_argument("--only", nargs="*", default=TARGETS, help="targets under tests/")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("--keep", action="store_true", help="keep and print the temp dir")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="seed-suite-")
    root = Path(tmp)
    export_tests(args.seed_git, args.revision, root)
    files, skipped = prepare(root, args.only)
    junit = root / "junit.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
               "no:randomly", f"--junitxml={junit}", "--rootdir", str(root),
               "-c", str(root / "pytest.ini"), *map(str, files)]
    if args.k:
        command += ["-k", args.k]
    subprocess.run(command, cwd=root, capture_output=True, text=True)
    results = summarise(junit, root) if junit.exists() else {}

    totals = defaultdict(int)
    groups = defaultdict(lambda: defaultdict(int))
    print(f"{'file':<62} {'pass':>5} {'fail':>5} {'skip':>5}")
    for file in sorted(results):
        counts = {k: len(results[file][k]) for k in ("passed", "failed", "skipped")}
        print(f"{file:<62} {counts['passed']:>5} {counts['failed']:>5} {counts['skipped']:>5}")
        group = "events" if file.startswith("events") else "rest"
        for key, value in counts.items():
            totals[key] += value
            groups[group][key] += value
    print(f"{'TOTAL':<62} {totals['passed']:>5} {totals['failed']:>5} {totals['skipped']:>5}")
    for group, counts in sorted(groups.items()):
        ran = counts["passed"] + counts["failed"]
        share = 100.0 * counts["passed"] / ran if ran else 0.0
        print(f"  {group}: {counts['passed']}/{ran} passed ({share:.1f} %)")
    reasons = defaultdict(int)
    for file in results:
        for reason in results[file]["skipped"]:
            reasons[reason] += 1
    for reason, count in sorted(reasons.items()):
        print(f"skipped {count}: {reason}")
    for file, reason in sorted(skipped.items()):
        print(f"not run: {file} ({reason})")
    failures = [line for file in sorted(results) for line in results[file]["failed"]]
    for line in failures:
        print(f"FAILED {line}")
    if args.keep:
        print(f"tests left in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures or not results else 0


if __name__ == "__main__":
    sys.exit(main())
