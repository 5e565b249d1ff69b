"""setup.py builds ``eekernels._C`` only when it can be used or is asked for, and says so in one line; the
torch-free ``_C`` builds here with nvcc and imports without a GPU.

The real build is the slow tier (`pytest -m slow`, run by .ci/run): one build per module, for a single arch,
through setup.py's own build_py + build_ext, so the ninja file, the static-cudart link and the manifest are
the ones users get. The build decision is checked in the default tier against a fake toolkit (an `nvcc`
that answers `--version`) and a fake `nvidia-smi`, so it runs on any machine in seconds.
"""
from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {p.stem for p in (ROOT / "csrc").glob("*.cu")}  # one kernel per csrc/<op>.cu
NVCC = (Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc") if os.environ.get("CUDA_HOME") else shutil.which("nvcc")
requires_nvcc = pytest.mark.skipif(
    not NVCC or not Path(NVCC).exists(), reason="nvcc is not on PATH (nor under CUDA_HOME): _C cannot be built here"
)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EEKERNELS_")}
    env.update(extra)
    return env


def _setup(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    # A new session has no controlling terminal, so setup.py's one line goes to stderr (see setup.say).
    return subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, start_new_session=True)


def _announced(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("eekernels: ")]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Build _C for sm_80 (+ compute_80 PTX) into a temp dir; returns the build_lib folder."""
    out = tmp_path_factory.mktemp("eek_build")
    res = _setup(["build", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
                 _env(EEKERNELS_CUDA_ARCHS="80", MAX_JOBS="2"), timeout=1800)  # minutes on 2 busy cores
    assert res.returncode == 0, f"setup.py build failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    # build_py and build_ext both ran; the decision is said once.
    assert _announced(res.stderr) == [f"eekernels: building _C (CUDA kernels) for sm_80 + compute_80 PTX with CUDA "
                                      f"{_cuda_release()} ({NVCC}): EEKERNELS_CUDA_ARCHS='80' asks for it; "
                                      "EEKERNELS_SKIP_CUDA_BUILD=1 skips it"], res.stderr[-3000:]
    return out / "lib"


def _cuda_release() -> str:
    text = subprocess.run([str(NVCC), "--version"], capture_output=True, text=True, check=True).stdout
    return re.search(r"release (\d+\.\d+)", text).group(1)


def _so(lib: Path) -> Path:
    found = sorted((lib / "eekernels").glob("_C*.so"))
    assert len(found) == 1, f"expected one eekernels/_C*.so under {lib}, found {found}"
    return found[0]


def _load_in_subprocess(so: Path) -> dict:
    """Import the .so on its own (no torch, no eekernels package) in a fresh process without a GPU."""
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('eekernels._C', {str(so)!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(json.dumps({'kernels': m.kernels(), 'build_info': m.build_info(), 'runtime': m.runtime_info(),\n"
        "                  'torch_loaded': 'torch' in sys.modules}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=_env(CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, f"importing {so.name} failed:\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@requires_nvcc
def test_imports_without_gpu_and_lists_kernels(built):
    info = _load_in_subprocess(_so(built))
    assert set(info["kernels"]) == KERNELS
    assert not info["torch_loaded"], "_C must not pull in torch"
    assert info["runtime"]["device_count"] == 0  # CUDA_VISIBLE_DEVICES="" : no GPU, and no exception


@pytest.mark.slow
@requires_nvcc
def test_build_info_is_sane(built):
    bi = _load_in_subprocess(_so(built))["build_info"]
    release = subprocess.run([str(NVCC), "--version"], capture_output=True, text=True).stdout
    assert f"release {bi['cuda_version']}," in release, (bi, release)
    assert bi["archs"] == ["80"]
    assert bi["nvcc_version"].startswith(bi["cuda_version"])
    assert bi["cudart"] == "static"
    assert set(bi["kernels"]) == KERNELS


@pytest.mark.slow
@requires_nvcc
def test_links_no_torch_and_static_cudart(built):
    if not shutil.which("ldd"):
        pytest.skip("ldd is not available on this machine")
    deps = subprocess.run(["ldd", str(_so(built))], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libcudart.so", "libpython"):
        assert lib not in deps, f"_C links {lib}:\n{deps}"
    assert "not found" not in deps, deps


@pytest.mark.slow
@requires_nvcc
def test_manifest_written_next_to_extension(built):
    manifest = json.loads((built / "eekernels" / "BUILD_MANIFEST.json").read_text())
    assert manifest["archs"] == ["80"] and manifest["ptx"] == "compute_80"
    assert manifest["cudart"] == "static" and manifest["torch"] is None
    assert manifest["python"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["extension"] == _so(built).name
    assert manifest["version"].startswith("0.1.0+cu")


@pytest.mark.slow
@requires_nvcc
def test_kernel_argument_errors_raise_before_any_launch(built):
    """Bad dtype codes / sizes are ValueErrors from C++, raised without touching a GPU."""
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('eekernels._C', {str(_so(built))!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "for call in (lambda: m.modulated_layer_norm(16, 16, 16, 16, 1, 1, 8, 8, 8, 1e-6, 7, 7, 0),\n"
        "             lambda: m.modulated_layer_norm(16, 16, 16, 16, 1, 1, 8, 8, 8, 1e-6, 2, 1, 0),\n"
        "             lambda: m.group_norm_act(16, 0, 0, 0, 0, 16, 1, 6, 4, 4, 24, 4, 1e-5, 3, 0, 0, 0),\n"
        "             lambda: m.group_norm_act(16, 0, 0, 0, 0, 16, 1, 8, 4, 4, 32, 4, 1e-5, 9, 0, 0, 0)):\n"
        "    try:\n"
        "        call()\n"
        "    except ValueError as e:\n"
        "        print('ValueError:', e)\n"
        "    else:\n"
        "        raise SystemExit('no ValueError')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=_env(CUDA_VISIBLE_DEVICES=""))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "x_dtype must be" in res.stdout and "param_dtype must equal" in res.stdout
    assert "G must be positive and divide C" in res.stdout and "activation must be" in res.stdout


def test_skip_cuda_build_builds_no_extension(tmp_path):
    res = _setup(["build", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                 _env(EEKERNELS_SKIP_CUDA_BUILD="1"), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    pkg = tmp_path / "lib" / "eekernels"
    assert (pkg / "__init__.py").exists()
    assert not list(pkg.glob("_C*.so")), "EEKERNELS_SKIP_CUDA_BUILD=1 still built _C"
    assert not (pkg / "BUILD_MANIFEST.json").exists(), "a pure build must not ship a CUDA build manifest"
    assert not (tmp_path / "tmp").exists() or not list((tmp_path / "tmp").rglob("*.o"))


@pytest.mark.parametrize(
    "env, want",
    [
        (dict(EEKERNELS_SKIP_CUDA_BUILD="1"), "0.1.0"),
        (dict(EEKERNELS_SKIP_CUDA_BUILD="1", EEKERNELS_LOCAL_VERSION="cu999"), "0.1.0+cu999"),
        (dict(EEKERNELS_LOCAL_VERSION=""), "0.1.0"),
    ],
)
def test_version_local_tag(env, want):
    res = _setup(["--version"], _env(**env), timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == want


@requires_nvcc
def test_version_derived_from_nvcc():
    res = _setup(["--version"], _env(EEKERNELS_CUDA_ARCHS="80"), timeout=60)
    release = subprocess.run([str(NVCC), "--version"], capture_output=True, text=True).stdout
    cu = "cu" + release.split("release ")[1].split(",")[0].replace(".", "")
    assert res.stdout.strip().splitlines()[-1] == f"0.1.0+{cu}"


def test_bad_arch_spec_is_a_clear_error(tmp_path):
    """Refused before any work, nvcc or not."""
    res = _setup(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                 _env(EEKERNELS_CUDA_ARCHS="ampere"), timeout=60)
    assert res.returncode != 0
    assert "EEKERNELS_CUDA_ARCHS: expected archs like '80;90a', got 'ampere'" in res.stderr
    assert not (tmp_path / "tmp").exists()


@requires_nvcc
def test_sdist_ships_sources_and_no_local_tag(tmp_path):
    """An sdist builds _C on install, so it carries csrc/ and a plain version (pip checks it on install)."""
    import tarfile

    res = _setup(["sdist", "-d", str(tmp_path)], _env(EEKERNELS_CUDA_ARCHS="80"), timeout=120)  # _C asked for
    assert res.returncode == 0, res.stderr[-3000:]
    (archive,) = tmp_path.glob("eekernels-*.tar.gz")
    assert archive.name == "eekernels-0.1.0.tar.gz"
    names = tarfile.open(archive).getnames()
    for src in ("common.cuh", "ops.h", "module.cpp", "modulated_layer_norm.cu", "gated_residual_norm.cu",
                "group_norm_act.cu"):
        assert f"eekernels-0.1.0/csrc/{src}" in names
    assert not any(n.endswith(("BUILD_MANIFEST.json", ".so")) for n in names)


def test_module_cpp_registers_every_kernel_in_csrc():
    """csrc/module.cpp's kernel_names() lists exactly the csrc/<op>.cu files (the one list of kernels)."""
    text = (ROOT / "csrc" / "module.cpp").read_text()
    listed = set(re.findall(r'"(\w+)"', re.search(r"kernel_names\(\)\s*\{([^}]*)\}", text).group(1)))
    assert listed == KERNELS


# --------------------------------------------------------------------------------------------------
# When _C is built, and the one line that says so
# --------------------------------------------------------------------------------------------------
H100 = "NVIDIA H100 80GB HBM3"


def _toolkit_env(tmp_path: Path, gpus: list[str], nvcc: bool = True, **extra) -> dict:
    """setup.py's environment with a fake CUDA 12.4 toolkit (CUDA_HOME/bin/nvcc answers --version) and a
    fake `nvidia-smi` on PATH listing `gpus` (as the real one does; "No devices were found", exit 6, for
    none). PATH holds nothing else, so no real nvcc or nvidia-smi of this machine takes part."""
    home, smi = tmp_path / "cuda", tmp_path / "smi"
    (home / "bin").mkdir(parents=True)
    smi.mkdir()
    if nvcc:
        (home / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    listing = "".join(f"echo 'GPU {i}: {name} (UUID: GPU-{i}0f3)'\n" for i, name in enumerate(gpus))
    (smi / "nvidia-smi").write_text("#!/bin/sh\n" + (listing or "echo 'No devices were found'; exit 6\n"))
    for tool in (home / "bin" / "nvcc", smi / "nvidia-smi"):
        if tool.exists():
            tool.chmod(0o755)
    env = {k: v for k, v in _env(**extra).items() if k not in ("CUDA_HOME", "CUDA_PATH", "CUDA_VISIBLE_DEVICES")}
    env.update(CUDA_HOME=str(home), PATH=f"{smi}{os.pathsep}{home / 'bin'}")
    env.update(extra)
    return env


DECISIONS = {
    "no GPU": ([], {}, None, 'nvcc is at {nvcc} but no GPU is visible (`nvidia-smi -L` lists none); '
                             'EEKERNELS_CUDA_ARCHS="80;90a" builds it anyway'),
    "a GPU": ([H100], {}, "sm_80, sm_90a + compute_90", f"a GPU is visible (`nvidia-smi -L` lists {H100})"),
    "GPU hidden": ([H100], dict(CUDA_VISIBLE_DEVICES=""), None,
                   'nvcc is at {nvcc} but no GPU is visible (CUDA_VISIBLE_DEVICES=\'\' hides every GPU); '
                   'EEKERNELS_CUDA_ARCHS="80;90a" builds it anyway'),
    "asked, no GPU": ([], dict(EEKERNELS_CUDA_ARCHS="sm_86"), "sm_86 + compute_86",
                      "EEKERNELS_CUDA_ARCHS='sm_86' asks for it"),
    "skipped": ([H100], dict(EEKERNELS_SKIP_CUDA_BUILD="1", EEKERNELS_CUDA_ARCHS="80"), None,
                "EEKERNELS_SKIP_CUDA_BUILD=1"),
}


@pytest.mark.parametrize("case", list(DECISIONS))
def test_C_is_built_only_when_usable_or_asked_for_and_one_line_says_why(tmp_path, case):
    gpus, extra, archs, why = DECISIONS[case]
    env = _toolkit_env(tmp_path, gpus, **extra)
    nvcc = str(tmp_path / "cuda" / "bin" / "nvcc")
    version = _setup(["--version"], env, timeout=60)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip().splitlines()[-1] == ("0.1.0+cu124" if archs else "0.1.0")
    assert not _announced(version.stderr), "only a build says what it builds"

    res = _setup(["build_py", "--build-lib", str(tmp_path / "lib")], env, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    why = why.format(nvcc=nvcc)
    if archs:
        want = f"eekernels: building _C (CUDA kernels) for {archs} PTX with CUDA 12.4 ({nvcc}): {why}; " \
               "EEKERNELS_SKIP_CUDA_BUILD=1 skips it"
    else:
        want = f"eekernels: not building _C (CUDA kernels; the ops run on Triton and torch): {why}"
    assert _announced(res.stderr) == [want]


def test_no_nvcc_builds_no_C_and_says_so(tmp_path):
    res = _setup(["build", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                 _toolkit_env(tmp_path, [H100], nvcc=False), timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _announced(res.stderr) == ["eekernels: not building _C (CUDA kernels; the ops run on Triton and torch): "
                                      "no nvcc (CUDA_HOME, CUDA_PATH, PATH)"]
    assert not list((tmp_path / "lib" / "eekernels").glob("_C*.so"))


def test_asking_for_C_without_nvcc_is_a_clear_error(tmp_path):
    res = _setup(["--version"], _toolkit_env(tmp_path, [], nvcc=False, EEKERNELS_CUDA_ARCHS="80"), timeout=60)
    assert res.returncode != 0
    assert ("EEKERNELS_CUDA_ARCHS='80' asks for eekernels._C, but no nvcc was found (CUDA_HOME, CUDA_PATH, PATH)"
            in res.stderr)


def _in_a_terminal(cmd: list[str], env: dict, cwd: Path, timeout: float) -> tuple[int, str]:
    """Run `cmd` with a pseudo-terminal as its controlling terminal, as at a person's shell; (exit code, output)."""
    import fcntl
    import pty
    import termios

    master, slave = pty.openpty()

    def attach():  # in the child: a new session whose controlling terminal is the pty
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, preexec_fn=attach)
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every writer of the terminal has exited
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(), out.decode(errors="replace")


@pytest.mark.slow
def test_pip_shows_the_line_in_a_terminal(tmp_path):
    """pip hides a build backend's stdout and stderr unless -v; the line still reaches the person running pip."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".*venv*", ".ci-*", "build", "dist", "out",
                                                            "*.egg-info", "__pycache__", "tests", "benchmarks", "docs",
                                                            "_C*.so", "BUILD_MANIFEST.json"))
    env = _toolkit_env(tmp_path, [], PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    rc, out = _in_a_terminal([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                              "-w", str(tmp_path / "wheels"), str(src)], env, tmp_path, timeout=600)
    assert rc == 0, out[-4000:]
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    assert (f"eekernels: not building _C (CUDA kernels; the ops run on Triton and torch): nvcc is at {nvcc} but "
            "no GPU is visible (`nvidia-smi -L` lists none)") in out, out[-4000:]
    assert out.count("_C (CUDA kernels") == 1, out[-4000:]
    assert [w.name for w in (tmp_path / "wheels").glob("*.whl")] == ["eekernels-0.1.0-py3-none-any.whl"]
