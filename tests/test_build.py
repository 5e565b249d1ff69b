"""The torch-free CUDA extension ``eekernels._C`` builds here with nvcc and imports without a GPU.

One build per session (module fixture), for a single arch to keep CI short: it goes through setup.py's
own build_ext, so the ninja file, the static-cudart link and the manifest are the ones users get.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import re

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
    return subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """Build _C for sm_80 (+ compute_80 PTX) into a temp dir; returns the build_lib folder."""
    out = tmp_path_factory.mktemp("eek_build")
    res = _setup(["build_ext", "--build-lib", str(out / "lib"), "--build-temp", str(out / "tmp")],
                 _env(EEKERNELS_CUDA_ARCHS="80", MAX_JOBS="2"))
    assert res.returncode == 0, f"setup.py build_ext failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return out / "lib"


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


@requires_nvcc
def test_imports_without_gpu_and_lists_kernels(built):
    info = _load_in_subprocess(_so(built))
    assert set(info["kernels"]) == KERNELS
    assert not info["torch_loaded"], "_C must not pull in torch"
    assert info["runtime"]["device_count"] == 0  # CUDA_VISIBLE_DEVICES="" : no GPU, and no exception


@requires_nvcc
def test_build_info_is_sane(built):
    bi = _load_in_subprocess(_so(built))["build_info"]
    release = subprocess.run([str(NVCC), "--version"], capture_output=True, text=True).stdout
    assert f"release {bi['cuda_version']}," in release, (bi, release)
    assert bi["archs"] == ["80"]
    assert bi["nvcc_version"].startswith(bi["cuda_version"])
    assert bi["cudart"] == "static"
    assert set(bi["kernels"]) == KERNELS


@requires_nvcc
def test_links_no_torch_and_static_cudart(built):
    if not shutil.which("ldd"):
        pytest.skip("ldd is not available on this machine")
    deps = subprocess.run(["ldd", str(_so(built))], capture_output=True, text=True, check=True).stdout
    for lib in ("libtorch", "libc10", "libcudart.so", "libpython"):
        assert lib not in deps, f"_C links {lib}:\n{deps}"
    assert "not found" not in deps, deps


@requires_nvcc
def test_manifest_written_next_to_extension(built):
    manifest = json.loads((built / "eekernels" / "BUILD_MANIFEST.json").read_text())
    assert manifest["archs"] == ["80"] and manifest["ptx"] == "compute_80"
    assert manifest["cudart"] == "static" and manifest["torch"] is None
    assert manifest["python"] == ".".join(map(str, sys.version_info[:3]))
    assert manifest["extension"] == _so(built).name
    assert manifest["version"].startswith("0.1.0+cu")


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
    res = _setup(["--version"], _env(), timeout=60)
    release = subprocess.run([str(NVCC), "--version"], capture_output=True, text=True).stdout
    cu = "cu" + release.split("release ")[1].split(",")[0].replace(".", "")
    assert res.stdout.strip().splitlines()[-1] == f"0.1.0+{cu}"


@requires_nvcc
def test_bad_arch_spec_is_a_clear_error(tmp_path):
    res = _setup(["build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp", str(tmp_path / "tmp")],
                 _env(EEKERNELS_CUDA_ARCHS="ampere"), timeout=60)
    assert res.returncode != 0
    assert "EEKERNELS_CUDA_ARCHS: expected archs like '80;90a', got 'ampere'" in res.stderr


@requires_nvcc
def test_sdist_ships_sources_and_no_local_tag(tmp_path):
    """An sdist builds _C on install, so it carries csrc/ and a plain version (pip checks it on install)."""
    import tarfile

    res = _setup(["sdist", "-d", str(tmp_path)], _env(), timeout=120)
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
