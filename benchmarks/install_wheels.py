"""Install carried wheels into a --target directory, offline, for a Python whose image lacks them.

The GPU machine cannot reach a package index, and its image already holds torch, transformers,
peft and their dependencies. A baseline that needs more (TRL's GRPOTrainer needs trl, datasets,
pyarrow, pandas ...) gets those as wheels carried in groups (.whl/c, .whl/d: one call carries a
limited size, so the groups may come in separate calls to the same warm machine). This script
installs, with `pip install --no-deps --target`, each carried wheel whose distribution the running
Python does not already have (in its site-packages or in the target) at a version every carried
wheel accepts, so nothing of the image is shadowed without need; running it again installs
nothing. Then it checks that every requirement of the carried wheels (with the extras they ask
for) is met by the image or the target, and lists what is not. Use the target with
PYTHONPATH=<target>.

Usage: python3 benchmarks/install_wheels.py --target DIR [--check [--image REQ ...]]
           [--imports MODULE ...] [--] WHEEL_OR_DIR ...
  --check  resolve only: say what would be installed and what would be missing, install nothing.
  --image  with --check, away from the machine: take its image to hold exactly these
           distributions (NAME==VERSION) instead of what the running Python has.
  --imports  after installing, import each module in a fresh Python with the target on
           PYTHONPATH and print its version or why it does not import.
Exit status 0 when nothing is missing, 1 otherwise.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version


def wheel_metadata(path: pathlib.Path) -> email.message.Message:
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(z.read(name).decode())


def requirements(meta, extras: set[str]) -> list[Requirement]:
    """The requirements a distribution's metadata asks for, given the extras wanted of it."""
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            out.append(req)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=pathlib.Path, required=True)
    parser.add_argument("--check", action="store_true", help="resolve only, install nothing")
    parser.add_argument("--image", nargs="*", default=None, metavar="NAME==VERSION",
                        help="with --check: the image's distributions (default: this Python's)")
    parser.add_argument("--imports", nargs="+", default=[], metavar="MODULE")
    parser.add_argument("wheels", nargs="+", type=pathlib.Path, help="wheel files or folders")
    args = parser.parse_args()
    if args.image is not None and not args.check:
        parser.error("--image describes another machine: use it with --check")
    files = []
    for p in args.wheels:
        files += sorted(p.glob("*.whl")) if p.is_dir() else [p] if p.exists() else []
    carried = {}  # name -> (version, path)
    for f in files:
        name, version, _, _ = parse_wheel_filename(f.name)
        carried[name] = (version, f)
    if not carried:
        raise SystemExit(f"no wheels in {', '.join(map(str, args.wheels))}")
    args.target.mkdir(parents=True, exist_ok=True)
    search = [str(args.target.resolve())] + sys.path
    image = None if args.image is None else {
        canonicalize_name(r.name): Version(str(next(iter(r.specifier)).version))
        for r in map(Requirement, args.image)}

    def installed(name: str):
        """(version, metadata or None) of what the machine has of `name`, or None."""
        if image is not None:
            return (image[name], None) if name in image else None
        dist = next(iter(importlib.metadata.distributions(name=name, path=search)), None)
        return dist and (Version(dist.version), dist.metadata)

    def fits(version: Version, reqs) -> bool:
        return all(r.specifier.contains(version, prereleases=True) for r in reqs)

    metas = {name: wheel_metadata(f) for name, (_, f) in carried.items()}
    wanted: dict[str, list[Requirement]] = {}  # every requirement the carried wheels make
    for meta in metas.values():
        for req in requirements(meta, set()):
            wanted.setdefault(canonicalize_name(req.name), []).append(req)
    todo, used = [], {}  # the wheels to install; name -> (version, metadata) the set will use
    for name, (version, f) in carried.items():
        have = installed(name)
        if have and fits(have[0], wanted.get(name, [])):
            used[name] = have
            print(f"present  {name} {have[0]}")
        elif fits(version, wanted.get(name, [])):
            todo.append(f)
            used[name] = (version, metas[name])
            print(f"install  {name} {version}" + (f" (the image's {have[0]} does not fit)"
                                                 if have else ""))
        else:
            print(f"unusable {name} {version}: wanted {[str(r) for r in wanted[name]]}")
    if todo and not args.check:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--no-compile", "--upgrade", "--target", str(args.target),
                        *map(str, todo)], check=True)
    # What the final set needs: each requirement of the distributions it uses (with the extras
    # asked of them) met by the target or the image, or (with --check) by a wheel to install.
    missing, seen = [], set()
    queue = [(r, n) for n, (_, meta) in used.items() if meta is not None
             for r in requirements(meta, set())]
    while queue:
        req, by = queue.pop()
        key = (canonicalize_name(req.name), str(req.specifier), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        name = key[0]
        have = used.get(name) if args.check and name in used else installed(name)
        if not have or not fits(have[0], [req]):
            missing.append(f"{req} (for {by}; "
                           + (f"found {have[0]})" if have else "not found)"))
            continue
        if req.extras and have[1] is not None:  # an --image entry has no metadata to expand
            queue += [(r, f"{name}[{','.join(sorted(req.extras))}]")
                      for r in requirements(have[1], set(req.extras))
                      if r.marker is not None]
    for line in sorted(missing):
        print(f"missing  {line}")
    print(f"{len(todo)} to install, {len(used) - len(todo)} present, {len(missing)} missing"
          + (" (check only)" if args.check else f"; target {args.target}"))
    failed = 0
    if not args.check:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(args.target.resolve())] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        for module in args.imports:
            proc = subprocess.run([sys.executable, "-c", f"import {module} as m; print("
                                   f"'import   {module}', m.__version__)"],
                                  capture_output=True, text=True, env=env)
            failed += proc.returncode != 0
            print(proc.stdout.strip() if proc.returncode == 0 else
                  f"import   {module} FAILED: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    sys.exit(1 if missing or failed else 0)


if __name__ == "__main__":
    main()
