"""Build script. Every switch is an environment variable:

EEKERNELS_SKIP_CUDA_BUILD=1   build no CUDA extension (pure torch + Triton package)
EEKERNELS_CUDA_ARCHS="80;90a" build eekernels._C for these GPU archs (PTX is added for the newest), GPU or not
EEKERNELS_LOCAL_VERSION=cu130 local version tag (default: from the detected nvcc when _C is built)
MAX_JOBS=N                    parallel nvcc jobs (ninja)
CUDA_HOME                     CUDA toolkit root (default: the nvcc on PATH)

`_C` is built when it can be used or is asked for (`cuda_decision`): nvcc is found and either a GPU is
visible (found without torch: `nvidia-smi -L`, else /proc/driver/nvidia/gpus; CUDA_VISIBLE_DEVICES="" or
"-1" hides them) or EEKERNELS_CUDA_ARCHS is set (python/build_wheels.py sets it). Every build prints one
line saying what is built and why (`say`). Otherwise this is a pure Python package and the wheel is
`py3-none-any`. With `_C`, the build makes `eekernels/_C*.so`: the csrc/ sources are compiled by nvcc
itself (no torch.utils.cpp_extension, no torch in the build), in parallel through a generated
build.ninja, and linked with the static CUDA runtime, so `_C` depends on no torch and no libcudart.so.
BUILD_MANIFEST.json (CUDA version, archs, compilers, Python, date) is written next to it, and the
version gets a local tag such as `0.1.0+cu130`.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "eekernels" / "_version.py").read_text()).group(1)
DEFAULT_ARCHS = "80;90a"
# One kernel per op stem: csrc/<op>.cu (the list of kernels is the folder; csrc/module.cpp registers them).
SOURCES = sorted(p.name for p in CSRC.glob("*.cu")) + ["module.cpp"]
MANIFEST = "BUILD_MANIFEST.json"


# --------------------------------------------------------------------------------------------------
# Toolkit discovery and options
# --------------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME (or CUDA_PATH) if set, else from PATH."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def nvcc_version(nvcc: str) -> tuple[str, str]:
    """(release, full version), e.g. ("13.0", "13.0.88"), parsed from `nvcc --version`."""
    text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"release (\d+\.\d+), V([\d.]+)", text)
    if not match:
        raise RuntimeError(f"cannot parse the CUDA version from `{nvcc} --version`:\n{text}")
    return match.group(1), match.group(2)


def want_cuda() -> bool:
    return os.environ.get("EEKERNELS_SKIP_CUDA_BUILD", "0").strip().lower() in ("", "0", "false", "no")


def visible_gpus() -> tuple[list[str], str]:
    """(the NVIDIA GPUs this build can see, how that was found), without torch (not in the build env).

    `nvidia-smi -L` where it is on PATH (its "GPU i: NAME (UUID: ...)" lines), else the driver's
    /proc/driver/nvidia/gpus/<PCI id> folders (Linux). CUDA_VISIBLE_DEVICES="" or "-1" hides them all.
    """
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={hidden!r} hides every GPU"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as e:
            return [], f"`nvidia-smi -L` failed ({type(e).__name__})"
        gpus = [line.split(" (UUID")[0].split(": ", 1)[-1] for line in res.stdout.splitlines()
                if line.startswith("GPU ")]
        return gpus, "`nvidia-smi -L` lists " + (", ".join(gpus) if gpus else "none")
    proc = Path("/proc/driver/nvidia/gpus")
    gpus = sorted(p.name for p in proc.iterdir()) if proc.is_dir() else []
    return gpus, (f"{proc} lists {', '.join(gpus)}" if gpus else f"no nvidia-smi on PATH and no GPU under {proc}")


def cuda_decision() -> tuple[str | None, list[str], str]:
    """(nvcc or None, archs, why): whether to build _C, for which archs, and the reason in words."""
    if not want_cuda():
        return None, [], f"EEKERNELS_SKIP_CUDA_BUILD={os.environ['EEKERNELS_SKIP_CUDA_BUILD']}"
    asked = os.environ.get("EEKERNELS_CUDA_ARCHS", "").strip()
    archs = parse_archs(asked) if asked else []  # a bad spec fails here, before any work
    nvcc = find_nvcc()
    if asked:
        if nvcc is None:
            raise RuntimeError(f"EEKERNELS_CUDA_ARCHS={asked!r} asks for eekernels._C, but no nvcc was found "
                               "(CUDA_HOME, CUDA_PATH, PATH): install the CUDA toolkit or unset it")
        return nvcc, archs, f"EEKERNELS_CUDA_ARCHS={asked!r} asks for it"
    if nvcc is None:
        return None, [], "no nvcc (CUDA_HOME, CUDA_PATH, PATH)"
    gpus, how = visible_gpus()
    if not gpus:
        return None, [], (f"nvcc is at {nvcc} but no GPU is visible ({how}); "
                          f"EEKERNELS_CUDA_ARCHS=\"{DEFAULT_ARCHS}\" builds it anyway")
    return nvcc, parse_archs(DEFAULT_ARCHS), f"a GPU is visible ({how})"


def say(line: str) -> None:
    """One line the person running the build sees. pip captures a backend's stdout and stderr and shows
    them only with -v (or on failure), so under pip, where stderr is not a terminal, the line goes to the
    controlling terminal (/dev/tty) when there is one; else (CI logs, `pip -v`, `python -m build`) stderr."""
    text = f"eekernels: {line}\n"
    if not sys.stderr.isatty():
        try:
            with open("/dev/tty", "w") as tty:
                tty.write("\n" + text)
            return
        except OSError:  # no controlling terminal
            pass
    sys.stderr.write(text)
    sys.stderr.flush()


def parse_archs(spec: str) -> list[str]:
    """ "80;90a", "8.0 9.0a", "sm_80,sm_90a" -> ["80", "90a"] (sorted, unique)."""
    archs = set()
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        a = item.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise ValueError(f"EEKERNELS_CUDA_ARCHS: expected archs like '80;90a', got {item!r} in {spec!r}")
        archs.add(a)
    if not archs:
        raise ValueError(f"EEKERNELS_CUDA_ARCHS: expected at least one arch, got {spec!r}")
    return sorted(archs, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def gencode_flags(archs: list[str]) -> tuple[list[str], str]:
    """SASS for every arch, PTX for the newest; returns (flags, ptx arch).

    The PTX drops an arch-specific suffix (90a -> compute_90): 'a'/'f' PTX only JIT-compiles on that
    exact family, and the point of PTX is to run on GPUs newer than any listed. Our kernels use no
    sm_90a-only instruction, so compute_90 PTX loses nothing.
    """
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = re.sub(r"[af]$", "", archs[-1])
    if newest == archs[-1]:  # the SASS pass already makes this PTX: embed it as well
        flags[-1] = f"-gencode=arch=compute_{newest},code=[sm_{newest},compute_{newest}]"
    else:
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags, f"compute_{newest}"


def local_version(cuda_release: str | None) -> str:
    """VERSION with the local tag from EEKERNELS_LOCAL_VERSION, else cuXYZ when _C is built.

    No derived tag for an sdist, nor when building from one (PKG-INFO at the root): pip requires the
    version built from an sdist to equal the sdist's own, which cannot know the installer's CUDA.
    """
    tag = os.environ.get("EEKERNELS_LOCAL_VERSION")
    if tag is None:
        from_sdist = "sdist" in sys.argv[1:] or (ROOT / "PKG-INFO").exists()
        tag = "cu" + cuda_release.replace(".", "") if cuda_release and not from_sdist else ""
    tag = tag.strip().lstrip("+")
    if tag and not re.fullmatch(r"[A-Za-z0-9]+(\.[A-Za-z0-9]+)*", tag):
        raise ValueError(f"EEKERNELS_LOCAL_VERSION: expected a local version like 'cu130', got {tag!r}")
    return f"{VERSION}+{tag}" if tag else VERSION


def host_compiler_version() -> str:
    for cc in (os.environ.get("NVCC_CCBIN"), "c++", "gcc"):
        if cc and shutil.which(cc):
            out = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else cc
    return "unknown"


def find_ninja() -> str | None:
    try:
        import ninja  # the pip package (a build requirement)

        candidate = Path(ninja.BIN_DIR) / "ninja"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("ninja")


# --------------------------------------------------------------------------------------------------
# The CUDA build: one nvcc per source through ninja, then `nvcc -shared --cudart static`.
# --------------------------------------------------------------------------------------------------
def _ninja_escape(path: str) -> str:
    return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def build_cuda_extension(output: Path, build_dir: Path, nvcc: str, archs: list[str], jobs: int,
                         version: str) -> dict:
    """Compile csrc/ into ``output`` (the _C shared object); returns the build manifest."""
    import pybind11

    release, full = nvcc_version(nvcc)
    gencode, ptx = gencode_flags(archs)
    build_dir.mkdir(parents=True, exist_ok=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Facts that build_info() reports, as a header (string macros do not survive nvcc's quoting reliably).
    info_header = build_dir / "eek_build_info.h"
    content = f'#define EEK_ARCHS "{";".join(archs)}"\n#define EEK_NVCC_VERSION "{full}"\n'
    if not info_header.exists() or info_header.read_text() != content:
        info_header.write_text(content)
    includes = [CSRC, build_dir, Path(pybind11.get_include()), Path(sysconfig.get_paths()["include"])]
    cflags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
              "-Xcompiler", "-fvisibility=hidden", "-include", str(info_header),
              *[f"-I{p}" for p in includes], *gencode]
    objects = [build_dir / (Path(src).stem + ".o") for src in SOURCES]

    ninja = find_ninja()
    if ninja:
        lines = [
            "ninja_required_version = 1.3",
            f"nvcc = {shlex.quote(nvcc)}",
            f"cflags = {shlex.join(cflags)}",
            "rule cuda",
            "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "  description = nvcc $in",
            "rule link",
            "  command = $nvcc -shared --cudart static $in -o $out",
            "  description = link $out",
        ]
        for src, obj in zip(SOURCES, objects):
            lines.append(f"build {_ninja_escape(str(obj))}: cuda {_ninja_escape(str(CSRC / src))}")
        lines.append(f"build {_ninja_escape(str(output))}: link " + " ".join(_ninja_escape(str(o)) for o in objects))
        ninja_file = build_dir / "build.ninja"
        ninja_file.write_text("\n".join(lines) + "\n")
        subprocess.run([ninja, "-f", str(ninja_file), "-j", str(jobs)], check=True, cwd=build_dir)
    else:  # no ninja: the same commands from a thread pool
        def compile_one(pair):
            src, obj = pair
            subprocess.run([nvcc, *cflags, "-c", str(CSRC / src), "-o", str(obj)], check=True)

        with ThreadPoolExecutor(max_workers=jobs) as pool:
            list(pool.map(compile_one, zip(SOURCES, objects)))
        subprocess.run([nvcc, "-shared", "--cudart", "static", *map(str, objects), "-o", str(output)], check=True)

    return {
        "package": "eekernels",
        "version": version,
        "cuda_version": release,
        "nvcc_version": full,
        "archs": archs,
        "ptx": ptx,
        "cudart": "static",
        "torch": None,
        "compiler": f"nvcc {full}; host {host_compiler_version()}",
        "python": platform.python_version(),
        "python_tag": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "platform": sysconfig.get_platform(),
        "build_date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "extension": output.name,
    }


@functools.cache  # once per process: from whichever build command runs first
def announce_decision() -> None:
    """The build's one line: what is built and why."""
    if BUILD_CUDA:
        _, ptx = gencode_flags(ARCHS)
        say(f"building _C (CUDA kernels) for {', '.join('sm_' + a for a in ARCHS)} + {ptx} PTX with CUDA "
            f"{CUDA_RELEASE} ({NVCC}): {WHY}; EEKERNELS_SKIP_CUDA_BUILD=1 skips it")
    else:
        say(f"not building _C (CUDA kernels; the ops run on Triton and torch): {WHY}")


class BuildCuda(build_ext):
    """Builds the `eekernels._C` placeholder Extension with nvcc + ninja instead of the C compiler."""

    def run(self):
        announce_decision()
        super().run()

    def build_extension(self, ext):
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        manifest = build_cuda_extension(output, Path(self.build_temp).resolve() / "eekernels_cuda", NVCC, ARCHS,
                                        max(1, jobs), self.distribution.get_version())
        self.manifest_path = output.parent / MANIFEST
        self.manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    def copy_extensions_to_source(self):
        """Editable / --inplace builds: the manifest goes next to the in-tree _C as well."""
        super().copy_extensions_to_source()
        built = getattr(self, "manifest_path", None)
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("eekernels"))
        if built is not None and built.exists():
            shutil.copyfile(built, package_dir / MANIFEST)


class BuildPy(build_py):
    """A pure build ships no BUILD_MANIFEST.json (one left in the tree by an earlier editable build)."""

    def run(self):
        announce_decision()
        super().run()
        if not BUILD_CUDA:
            stale = Path(self.build_lib) / "eekernels" / MANIFEST
            if stale.exists():
                stale.unlink()


NVCC, ARCHS, WHY = cuda_decision()
BUILD_CUDA = NVCC is not None
CUDA_RELEASE = nvcc_version(NVCC)[0] if BUILD_CUDA else None

setup(
    version=local_version(CUDA_RELEASE),
    # A placeholder Extension: it makes the wheel platform-tagged and routes editable installs through
    # build_ext (inplace), while BuildCuda does the actual compile and link.
    ext_modules=[Extension("eekernels._C", sources=[])] if BUILD_CUDA else [],
    cmdclass={"build_ext": BuildCuda, "build_py": BuildPy},
)
