"""The bench scripts as a user meets them: --help answers without running anything, and the
runners share their helpers through bench/common.py instead of importing one another."""
import ast
import concurrent.futures
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "bench").glob("*.py") if p.name != "common.py")


def test_every_bench_script_answers_help_and_runs_nothing():
    def ask(script):
        return subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, timeout=60,
                              capture_output=True, text=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as ex:
        results = dict(zip(SCRIPTS, ex.map(ask, SCRIPTS)))
    for script, r in results.items():
        assert r.returncode == 0, f"{script.name}: {r.stderr}"
        assert r.stdout.startswith(f"usage: {script.name}"), f"{script.name}: {r.stdout[:200]}"
        assert r.stderr == "", f"{script.name} wrote to stderr: {r.stderr[:200]}"


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_no_bench_script_imports_another_but_common(script):
    names = {p.stem for p in SCRIPTS}
    imported = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module)
    assert imported & names <= {"bench_step"}, f"{script.name} imports {imported & names}"
