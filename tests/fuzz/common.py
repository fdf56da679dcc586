"""Shared pieces of the property-based fuzz suites (hypothesis).

Every suite feeds generated malformed inputs to a parser through the library and through the
CLI (in this process, `fastlora_jax.cli.main`), and checks that each one either works or ends in
a `FastLoRAError` subclass (any other exception fails the test), that the CLI then prints one
`error: ...` line and exits with 2, and that nothing was left half-written. Runs are
reproducible (`derandomize=True`) and untimed (`deadline=None`); `CASES` examples each.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import tempfile
from typing import Any, Callable

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from fastlora_jax.cli import main
from fastlora_jax.errors import FastLoRAError

CASES = 200
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much])

# JSON values of every kind, nested a little: what a corrupted or hand-edited file may hold
json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 65), 2 ** 65)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=8)


def outcome(call: Callable[[], Any]) -> FastLoRAError | None:
    """None when `call` works, its FastLoRAError when it fails; any other exception propagates
    (and fails the test)."""
    try:
        call()
    except FastLoRAError as err:
        assert str(err), "an error without a message"
        return err
    return None


def cli_error(argv: list[str]) -> str:
    """Run the CLI in this process; it must exit 2 with one `error: ...` message on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    text = err.getvalue()
    assert code == 2, (code, text)
    assert [line for line in text.splitlines() if line.startswith("error: ")], text
    assert "Traceback" not in text, text
    return text


def fresh_dir(root: pathlib.Path) -> pathlib.Path:
    """A new empty folder under `root` for one example."""
    return pathlib.Path(tempfile.mkdtemp(dir=root))


def entries(folder: pathlib.Path) -> list[str]:
    """Everything under `folder`, relative, hidden files included (to spot partial writes)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Counter:
    """Counts a suite's examples, so that each test can check it really ran CASES of them."""

    def __init__(self) -> None:
        self.seen = 0
        self.failed = 0

    def add(self, error: FastLoRAError | None) -> None:
        self.seen += 1
        self.failed += error is not None
