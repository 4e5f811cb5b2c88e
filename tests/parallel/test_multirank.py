"""Runs every multi-rank test (tests/**/dist_*.py) in one 4-rank torchrun and reports each.

See tests/conftest.py for how the ranks record their outcomes.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
WORLD = 4
DIST_FILES = sorted(TESTS.rglob("dist_*.py"))
CASES = [
    (path, node.name)
    for path in DIST_FILES
    for node in ast.parse(path.read_text()).body
    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
]


@pytest.fixture(scope="session")
def multirank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multirank")
    env = {**os.environ, "FINEVIT_DIST_RESULTS": str(out), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "--rootdir", str(TESTS.parent), *map(str, DIST_FILES)]
    proc = subprocess.run(cmd, cwd=TESTS.parent, env=env, capture_output=True, text=True,
                          timeout=900)
    results = {}
    for rank in range(WORLD):
        path = out / f"rank{rank}.jsonl"
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            results.setdefault((r["file"], r["name"]), {}).setdefault(rank, []).append(r)
    return results, proc


@pytest.mark.parametrize("path,name", CASES, ids=[f"{p.stem}::{n}" for p, n in CASES])
def test_multirank(path, name, multirank_results):
    results, proc = multirank_results
    per_rank = results.get((path.name, name))
    if per_rank is None:
        pytest.fail(f"{name} reported nothing; torchrun exited {proc.returncode}:\n"
                    f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    for rank in range(WORLD):
        reports = per_rank.get(rank)
        assert reports, f"rank {rank} did not run {name}"
        failed = [r for r in reports if r["outcome"] == "failed"]
        if failed:
            pytest.fail(f"rank {rank}: {failed[0]['when']} failed\n{failed[0]['text'][-6000:]}")
    if all(r["outcome"] == "skipped" for rs in per_rank.values() for r in rs):
        pytest.skip(per_rank[0][0]["text"] or "skipped on every rank")
