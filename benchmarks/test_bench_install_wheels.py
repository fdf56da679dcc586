"""benchmarks/install_wheels.py on two tiny wheels made here: what it installs, skips and
reports missing, offline, into a --target, and that a second run installs nothing."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

SCRIPT = pathlib.Path(__file__).with_name("install_wheels.py")


def make_wheel(folder: pathlib.Path, name: str, version: str, requires: list[str]) -> None:
    info = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": f"__version__ = '{version}'\n",
             f"{info}/METADATA": "Metadata-Version: 2.1\n" f"Name: {name}\nVersion: {version}\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        for path, text in files.items():
            z.writestr(path, text)


def install(*args) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True)
    return proc.returncode, proc.stdout + proc.stderr


def test_checks_installs_once_and_names_what_is_missing(tmp_path):
    both, alone = tmp_path / "both", tmp_path / "alone"
    both.mkdir(), alone.mkdir()
    make_wheel(both, "flalpha", "1.0", ["flbeta>=2.0", "flbeta[fast]; extra == 'speed'"])
    make_wheel(both, "flbeta", "2.0", [])
    make_wheel(alone, "flalpha", "1.0", ["flbeta>=2.0"])
    target = tmp_path / "target"

    rc, out = install("--target", target, "--check", "--image", "--", both)
    assert rc == 0 and "2 to install, 0 present, 0 missing" in out, out
    rc, out = install("--target", target, "--check", "--image", "flbeta==1.5", "--", alone)
    assert rc == 1 and "missing  flbeta>=2.0 (for flalpha; found 1.5)" in out, out
    rc, out = install("--target", target, "--check", "--image", "flbeta==2.5", "--", both)
    assert rc == 0 and "present  flbeta 2.5" in out and "install  flalpha 1.0" in out, out

    rc, out = install("--target", target, "--imports", "flalpha", "flbeta", "--", both)
    assert rc == 0 and "2 to install" in out and "import   flbeta 2.0" in out, out
    assert (target / "flalpha" / "__init__.py").exists()
    rc, out = install("--target", target, "--", both)
    assert rc == 0 and "0 to install, 2 present, 0 missing" in out, out
