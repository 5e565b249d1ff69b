"""Build an ``eekernels-X.Y.Z+cuXYZ`` wheel for one CUDA toolkit, then check what it holds.

    python python/build_wheels.py --cuda-home /usr/local/cuda-13.0 --archs "80;90a" --out dist/

Steps:
1. ``pip wheel .`` with CUDA_HOME, EEKERNELS_CUDA_ARCHS and EEKERNELS_LOCAL_VERSION set (the tag from
   ``--local-version`` or from the toolkit's nvcc, e.g. cu130); setup.py compiles ``_C`` with that nvcc
   and writes BUILD_MANIFEST.json into the package, so the manifest travels inside the wheel.
2. Checks on the wheel: platform-tagged, holds exactly one ``eekernels/_C*.so`` and the manifest (with
   the requested archs and the toolkit's CUDA version); ``ldd`` on ``_C`` shows no libtorch / libc10 and
   no libcudart.so (static runtime); ``_C`` imports in a fresh process (no torch, no GPU needed) and
   lists the expected kernels.
Exits non-zero with the reason when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {p.stem for p in (ROOT / "csrc").glob("*.cu")}  # one kernel per csrc/<op>.cu
FORBIDDEN_LIBS = ("libtorch", "libc10", "libcudart.so")


def cuda_release(nvcc: Path) -> str:
    text = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+)", text)
    if not match:
        raise SystemExit(f"cannot read the CUDA release from `{nvcc} --version`:\n{text}")
    return match.group(1)


def build(cuda_home: Path, archs: str, local: str, out: Path, jobs: int | None, isolation: bool) -> Path:
    env = dict(os.environ, CUDA_HOME=str(cuda_home), EEKERNELS_CUDA_ARCHS=archs, EEKERNELS_LOCAL_VERSION=local)
    env["PATH"] = f"{cuda_home / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.pop("EEKERNELS_SKIP_CUDA_BUILD", None)
    if jobs:
        env["MAX_JOBS"] = str(jobs)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("eekernels-*.whl"))
    cmd = [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-w", str(out)]
    if not isolation:
        cmd.append("--no-build-isolation")  # use this environment's setuptools, pybind11, ninja (offline)
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)
    made = sorted(set(out.glob(f"eekernels-*+{local}-*.whl")) - before) or sorted(out.glob(f"eekernels-*+{local}-*.whl"))
    if not made:
        raise SystemExit(f"no eekernels-*+{local}-*.whl appeared in {out}")
    return max(made, key=lambda p: p.stat().st_mtime)


def check(wheel: Path, archs: str, release: str) -> dict:
    """Every check on the built wheel; returns the manifest read from it."""
    if wheel.name.endswith("-none-any.whl"):
        raise SystemExit(f"{wheel.name}: a pure wheel, _C was not built")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        sos = [n for n in names if re.fullmatch(r"eekernels/_C[^/]*\.so", n)]
        if len(sos) != 1:
            raise SystemExit(f"{wheel.name}: expected one eekernels/_C*.so, found {sos}")
        if "eekernels/BUILD_MANIFEST.json" not in names:
            raise SystemExit(f"{wheel.name}: no eekernels/BUILD_MANIFEST.json")
        manifest = json.loads(zf.read("eekernels/BUILD_MANIFEST.json"))
        with tempfile.TemporaryDirectory() as tmp:
            so = Path(zf.extract(sos[0], tmp))
            deps = subprocess.run(["ldd", str(so)], capture_output=True, text=True, check=True).stdout
            bad = [lib for lib in FORBIDDEN_LIBS if lib in deps]
            if bad or "not found" in deps:
                raise SystemExit(f"{sos[0]} links {bad or 'missing libraries'}:\n{deps}")
            code = (
                "import importlib.util, json, sys\n"
                f"spec = importlib.util.spec_from_file_location('eekernels._C', {str(so)!r})\n"
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
                "print(json.dumps({'kernels': m.kernels(), 'build_info': m.build_info(),\n"
                "                  'torch': 'torch' in sys.modules}))\n"
            )
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
            if res.returncode != 0:
                raise SystemExit(f"importing {sos[0]} failed:\n{res.stderr}")
            info = json.loads(res.stdout.strip().splitlines()[-1])
    if set(info["kernels"]) != KERNELS:
        raise SystemExit(f"_C.kernels() = {info['kernels']}, expected {sorted(KERNELS)}")
    if info["torch"]:
        raise SystemExit("importing _C pulled in torch")
    wanted = [a for a in re.split(r"[;,\s]+", archs) if a]
    wanted = sorted({a.lower().removeprefix("sm_").replace(".", "") for a in wanted})
    if sorted(manifest["archs"]) != wanted or sorted(info["build_info"]["archs"]) != wanted:
        raise SystemExit(f"archs: manifest {manifest['archs']}, _C {info['build_info']['archs']}, wanted {wanted}")
    if manifest["cuda_version"] != release or info["build_info"]["cuda_version"] != release:
        raise SystemExit(f"CUDA version: manifest {manifest['cuda_version']}, _C "
                         f"{info['build_info']['cuda_version']}, toolkit {release}")
    return manifest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_home = os.environ.get("CUDA_HOME") or (str(Path(shutil.which("nvcc")).resolve().parents[1])
                                                   if shutil.which("nvcc") else None)
    p.add_argument("--cuda-home", default=default_home, help="CUDA toolkit root (default: CUDA_HOME, else the nvcc on PATH)")
    p.add_argument("--archs", default="80;90a", help="EEKERNELS_CUDA_ARCHS for the build (default 80;90a)")
    p.add_argument("--local-version", help="local version tag (default: cuXYZ from the toolkit's nvcc)")
    p.add_argument("--out", default=str(ROOT / "dist"), help="where the wheel goes (default dist/)")
    p.add_argument("--jobs", type=int, help="MAX_JOBS for the parallel nvcc compile")
    p.add_argument("--build-isolation", action="store_true",
                   help="let pip build in an isolated env (needs setuptools, pybind11, ninja from an index)")
    args = p.parse_args(argv)
    if not args.cuda_home:
        raise SystemExit("no CUDA toolkit: pass --cuda-home or put nvcc on PATH")
    cuda_home = Path(args.cuda_home)
    nvcc = cuda_home / "bin" / "nvcc"
    if not nvcc.is_file():
        raise SystemExit(f"--cuda-home {cuda_home}: no bin/nvcc there")
    release = cuda_release(nvcc)
    local = (args.local_version or "cu" + release.replace(".", "")).lstrip("+")
    wheel = build(cuda_home, args.archs, local, Path(args.out), args.jobs, args.build_isolation)
    manifest = check(wheel, args.archs, release)
    print(f"OK {wheel}\n" + json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
