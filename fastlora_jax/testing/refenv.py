"""Drive the reference environment (.refenv: Python 3.11 + torch CPU + transformers + peft + gguf +
bitsandbytes) in a subprocess, exactly as a user of our exports would load them.

`run_reference(script, arrays, **kwargs)` writes `arrays` to an .npz, runs `script` (Python source)
under .refenv with the globals `INPUTS` (dict of numpy arrays), `ARGS` (the kwargs, JSON) and
`OUTPUTS` (a dict the script fills with numpy arrays), and returns OUTPUTS.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import tempfile
import textwrap

import numpy as np

# The checkout this package runs from (an editable install): .refenv lives at its root.
REPO = pathlib.Path(__file__).resolve().parents[2]
REFENV_PYTHON = REPO / ".refenv" / "bin" / "python"

_PRELUDE = textwrap.dedent("""
    import json, sys
    import numpy as np
    _inp, _out, _args = sys.argv[1], sys.argv[2], sys.argv[3]
    INPUTS = dict(np.load(_inp))
    ARGS = json.loads(open(_args).read())
    OUTPUTS = {}
""")
_EPILOGUE = "\nnp.savez(_out, **{k: np.asarray(v) for k, v in OUTPUTS.items()})\n"


def refenv_available() -> bool:
    return REFENV_PYTHON.exists()


class RefenvMissing(RuntimeError):
    """The reference environment is not set up: a parity test cannot run, and says so."""


def require_refenv() -> None:
    """Fail (never skip) when the reference environment is missing: a parity suite that skips
    when nothing can be compared looks like a passing one."""
    if not REFENV_PYTHON.exists():
        raise RefenvMissing(f"reference environment missing: {REFENV_PYTHON} does not exist; "
                            f"run `bash scripts/setup.sh` first (it builds .refenv)")


def run_reference(script: str, arrays: dict[str, np.ndarray] | None = None, *,
                  timeout: float = 900, **kwargs) -> dict[str, np.ndarray]:
    """Run `script` in the reference environment; return the arrays it put in OUTPUTS."""
    require_refenv()
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = pathlib.Path(tmp)
        inp, out, args, src = (tmpdir / "in.npz", tmpdir / "out.npz", tmpdir / "args.json",
                               tmpdir / "script.py")
        np.savez(inp, **(arrays or {}))
        args.write_text(json.dumps(kwargs))
        src.write_text(_PRELUDE + textwrap.dedent(script) + _EPILOGUE)
        proc = subprocess.run([str(REFENV_PYTHON), str(src), str(inp), str(out), str(args)],
                              capture_output=True, text=True, timeout=timeout,
                              env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                   "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                                   "HOME": str(tmpdir)})
        if proc.returncode != 0:
            raise RuntimeError(f"reference script failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        with np.load(out) as data:
            return {k: data[k] for k in data.files}
