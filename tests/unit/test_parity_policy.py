"""Parity tests never skip for want of the reference environment: they all error, saying to
run setup."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from fastlora_jax.testing.refenv import REPO

PARITY = sorted((REPO / "tests" / "parity").glob("test_*.py"))


def test_no_parity_file_skips():
    for path in PARITY:
        for node in ast.walk(ast.parse(path.read_text())):
            name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)
            assert name not in ("skip", "skipif", "importorskip"), f"{path.name} skips"


def test_without_the_reference_environment_every_parity_test_errors():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.refenv_missing",
                           "-p", "no:cacheprovider", "tests/parity"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"=* ?\d+ errors? in .*", summary), summary  # nothing passed or skipped
    errored = [line.split()[1].split("::")[0] for line in proc.stdout.splitlines()
               if line.startswith("ERROR tests/parity/")]
    assert len(errored) == int(summary.strip("= ").split()[0])
    assert sorted(set(errored)) == [f"tests/parity/{p.name}" for p in PARITY]
    assert "run `bash scripts/setup.sh` first" in proc.stdout, proc.stdout[-2000:]
