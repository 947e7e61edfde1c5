"""The CUDA sources compile, and setup.py decides correctly when to build them.

No GPU is needed: every csrc/cuda/*.cu is compiled with nvcc (as setup.py's CUDA build compiles
it: same flags, plus the ones torch's BuildExtension adds), and every csrc/cuda/*.cpp binding file
is syntax-checked with g++ against torch's headers, so a broken kernel or binding fails here even
on a machine without a GPU. Skipped, with the reason, where nvcc / g++ / torch's c10/cuda headers
are missing.

Compile time: the default run compiles each .cu for sm_90 (the H100 the GPU benchmarks target),
plus sm_80 for files that branch on __CUDA_ARCH__ -- the only way two targets' front ends can
differ. Every syntax, template and ptxas (register / shared-memory) error shows up with one target;
compiling all of them for both doubles the device code generation, which dominates (cicc + ptxas
are ~80% of nvcc's time on spmm.cu), for no more coverage. The full two-target build check is the
`slow` test below.
"""

from __future__ import annotations

import concurrent.futures
import glob
import importlib.util
import os
import shutil
import subprocess
import time

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
CPP_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cpp")))
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
WORKERS = 2  # parallel compiler processes; nvcc on a big .cu takes a core and ~1 GiB

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources not compiled")


def load_setup():
    """setup.py as a module, without building anything (setup() runs only under __main__)."""
    spec = importlib.util.spec_from_file_location("torchprune_setup", os.path.join(ROOT, "setup.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SETUP = load_setup()


def nvcc_command(source: str, output: str, archs) -> list:
    """The command BuildExtension would run for `source`: setup.py's nvcc flags with the target
    GPUs replaced by `archs`, torch's common nvcc flags, our include dir and macro."""
    flags = [f for f in SETUP.nvcc_flags() if not f.startswith("-gencode")]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return ([NVCC, *flags, *gencode, *cpp_extension.COMMON_NVCC_FLAGS, "-DTORCHPRUNE_WITH_CUDA",
             f"-I{CSRC}", "-c", source, "-o", output])


def run_all(commands: dict) -> dict:
    """Runs {name: command} on WORKERS processes; returns {name: (returncode, output, seconds)}."""
    def run(command):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        return done.returncode, done.stdout + done.stderr, time.perf_counter() - start

    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {name: pool.submit(run, command) for name, command in commands.items()}
        return {name: future.result() for name, future in futures.items()}


def assert_all_compiled(results: dict) -> None:
    failed = {name: out for name, (code, out, _) in results.items() if code != 0}
    timings = ", ".join(f"{name} {seconds:.1f}s" for name, (_, _, seconds) in results.items())
    print(f"compiled: {timings}")
    assert not failed, "\n\n".join(f"{name} failed:\n{out[-4000:]}" for name, out in failed.items())


def default_jobs(tmp_path):
    jobs = {}
    for source in CU_FILES:
        name = os.path.basename(source)
        with open(source) as f:
            archs = ["90", "80"] if "__CUDA_ARCH__" in f.read() else ["90"]
        for arch in archs:
            jobs[f"{name} sm_{arch}"] = nvcc_command(source, str(tmp_path / f"{name}.{arch}.o"), [arch])
    return jobs


@needs_nvcc
def test_cuda_sources_compile(tmp_path):
    assert CU_FILES, "csrc/cuda/ holds no .cu files"
    assert_all_compiled(run_all(default_jobs(tmp_path)))


@needs_nvcc
@pytest.mark.slow
def test_cuda_sources_compile_for_every_target(tmp_path):
    """Exactly the device code of the real build: sm_80 and sm_90 in one nvcc call per file."""
    jobs = {os.path.basename(s): nvcc_command(s, str(tmp_path / (os.path.basename(s) + ".o")), ["80", "90"])
            for s in CU_FILES}
    assert_all_compiled(run_all(jobs))


@needs_nvcc
def test_a_broken_kernel_fails_the_check(tmp_path):
    """The harness above really reports compile errors (a type error in device code)."""
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* p) { p[0] = undeclared_name; }\n")
    results = run_all({"broken.cu": nvcc_command(str(broken), str(tmp_path / "broken.o"), ["90"])})
    code, output, _ = results["broken.cu"]
    assert code != 0 and "undeclared_name" in output
    with pytest.raises(AssertionError, match="broken.cu failed"):
        assert_all_compiled(results)


# ---------------------------------------------------------------------------------------------
# The .cpp binding files (TORCH_LIBRARY_IMPL(torchprune, CUDA, ...)) against torch's headers


def cuda_include_dir():
    """The CUDA runtime headers: $CUDA_HOME, $CUDA_PATH, next to nvcc, or /usr/local/cuda."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        candidates.insert(2, os.path.dirname(os.path.dirname(os.path.realpath(NVCC))))
    for home in filter(None, candidates):
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


def syntax_jobs(tmp_path):
    torch_include = cpp_extension.include_paths()[0]
    if not os.path.exists(os.path.join(torch_include, "c10", "cuda", "CUDAStream.h")):
        pytest.skip("this torch ships no c10/cuda headers: CUDA bindings not checked")
    cuda_include = cuda_include_dir()
    if cuda_include is None:
        pytest.skip("no CUDA runtime headers (cuda_runtime_api.h) found: CUDA bindings not checked")
    if GXX is None:
        pytest.skip("g++ is not on PATH: CUDA bindings not checked")
    # A CPU-only torch lacks the one header its CUDA build generates; this is its content there.
    generated = tmp_path / "generated" / "c10" / "cuda" / "impl"
    generated.mkdir(parents=True)
    (generated / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{CSRC}", *(f"-I{p}" for p in cpp_extension.include_paths()),
                f"-I{tmp_path / 'generated'}", f"-I{cuda_include}"]
    return {os.path.basename(source): [GXX, "-std=c++20", "-fsyntax-only", "-DTORCHPRUNE_WITH_CUDA",
                                       "-DTORCH_API_INCLUDE_EXTENSION_H", *includes, source]
            for source in CPP_FILES}


@needs_nvcc
def test_cuda_bindings_pass_a_syntax_check(tmp_path):
    assert CPP_FILES, "csrc/cuda/ holds no .cpp binding files"
    assert_all_compiled(run_all(syntax_jobs(tmp_path)))


# ---------------------------------------------------------------------------------------------
# setup.py: when is the CUDA extension built, and what goes into it


@pytest.fixture
def env(monkeypatch):
    for name in ("TORCHPRUNE_NO_CUDA", "FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def pretend_cuda_toolkit(env, tmp_path, found=True):
    """A CUDA-built torch with (or without) nvcc, on any machine."""
    home = str(tmp_path / "cuda") if found else None
    env.setattr(torch.version, "cuda", "12.8")
    env.setattr(SETUP, "CUDA_HOME", home)
    env.setattr(cpp_extension, "CUDA_HOME", home)
    env.setattr(SETUP.shutil, "which", lambda name: os.path.join(home, "bin", name) if found else None)


def test_no_cuda_wins_over_everything(env, tmp_path):
    pretend_cuda_toolkit(env, tmp_path)
    env.setenv("FORCE_CUDA", "1")
    env.setenv("TORCHPRUNE_NO_CUDA", "1")
    assert SETUP.use_cuda() is False


def test_force_cuda_without_nvcc_builds_the_cpu_ops(env, tmp_path):
    pretend_cuda_toolkit(env, tmp_path, found=False)
    env.setenv("FORCE_CUDA", "1")
    assert SETUP.use_cuda() is False


def test_force_cuda_with_a_cpu_only_torch_builds_the_cpu_ops(env, tmp_path):
    pretend_cuda_toolkit(env, tmp_path)
    env.setattr(torch.version, "cuda", None)
    env.setenv("FORCE_CUDA", "1")
    assert SETUP.use_cuda() is False


def test_force_cuda_with_nvcc_builds_cuda(env, tmp_path):
    pretend_cuda_toolkit(env, tmp_path)
    env.setenv("FORCE_CUDA", "1")
    assert SETUP.use_cuda() is True


def test_no_gpu_and_no_force_builds_the_cpu_ops(env, tmp_path):
    pretend_cuda_toolkit(env, tmp_path)
    env.setattr(torch.cuda, "is_available", lambda: False)
    assert SETUP.use_cuda() is False


def test_cpu_extension_has_no_cuda_sources(env):
    env.setattr(SETUP, "use_cuda", lambda: False)
    (ext,) = SETUP.extensions()
    assert not any("/cuda/" in s or s.endswith(".cu") for s in ext.sources)
    assert "csrc/torchprune.cpp" in ext.sources and "nvcc" not in ext.extra_compile_args


def test_cuda_extension_sources_and_flags(env, tmp_path):
    pretend_cuda_toolkit(env, tmp_path)
    env.setattr(SETUP, "use_cuda", lambda: True)
    (ext,) = SETUP.extensions()
    rel = lambda paths: {os.path.relpath(os.path.join(ROOT, p), ROOT) for p in paths}  # noqa: E731
    assert rel(glob.glob("csrc/cuda/*.cu", root_dir=ROOT)
               + glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)) <= set(ext.sources)
    assert "csrc/cpu/masked_ops.cpp" in ext.sources  # the CPU ops are in the CUDA build too
    assert ("TORCHPRUNE_WITH_CUDA", None) in ext.define_macros
    nvcc = ext.extra_compile_args["nvcc"]
    assert "-O3" in nvcc and "-std=c++17" in nvcc and "--use_fast_math" not in nvcc
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc and "-gencode=arch=compute_90,code=sm_90" in nvcc
    assert "cudart" in ext.libraries

    env.setenv("TORCH_CUDA_ARCH_LIST", "8.6")  # BuildExtension turns this into -gencode itself
    (ext,) = SETUP.extensions()
    assert not any(f.startswith("-gencode") for f in ext.extra_compile_args["nvcc"])


def test_version_comes_from_the_package():
    from torchprune._version import __version__

    assert SETUP.read_version() == __version__
