"""Build and install torchprune: the Python package plus its C++ ops, ``torchprune._C``.

    pip install --no-build-isolation -e ".[test]"   # development install (editable)
    pip install --no-build-isolation .              # regular install
    python setup.py build_ext --inplace             # rebuild only the C++ ops, in the source tree

PyTorch must be installed *before* torchprune, and the build must see it (hence
``--no-build-isolation``): the extension is compiled against the exact torch it will run with, and
an isolated build environment would download a different torch and break that ABI match. For the
same reason torch is not listed in ``install_requires``.
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
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# ninja would otherwise start #cores + 2 compiler processes; 2 keeps small machines responsive.
os.environ.setdefault("MAX_JOBS", "2")


def use_cuda() -> bool:
    """Whether to build the CUDA ops: TORCHPRUNE_NO_CUDA=1 says no; otherwise yes when torch sees
    a GPU (or FORCE_CUDA=1, for building on a machine without one) and nvcc can be found."""
    if os.environ.get("TORCHPRUNE_NO_CUDA", "0") == "1":
        return False
    wanted = torch.cuda.is_available() or os.environ.get("FORCE_CUDA", "0") == "1"
    has_nvcc = shutil.which("nvcc") is not None or (
        CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    )
    return wanted and has_nvcc


def cxx_flags():
    """-O3 plus OpenMP, so that at::parallel_for in our kernels really runs in parallel. The C++
    standard flag is left to BuildExtension, which adds the one this torch requires (torch 2.13:
    -std=c++20; passing -std=c++17 ourselves would stop it from doing so and break the build)."""
    if sys.platform == "win32":
        return ["/O2", "/openmp"], []
    if sys.platform == "darwin":  # Apple clang has no plain -fopenmp; kernels run serially there
        return ["-O3"], []
    return ["-O3", "-fopenmp"], ["-fopenmp"]


def extensions():
    sources = ["csrc/torchprune.cpp"] + sorted(
        glob.glob("csrc/autograd/*.cpp", root_dir=ROOT)
        + glob.glob("csrc/autocast/*.cpp", root_dir=ROOT)
        + glob.glob("csrc/cpu/*.cpp", root_dir=ROOT)
    )
    compile_args, link_args = cxx_flags()

    # ---- CUDA (a later issue) ------------------------------------------------------------------
    # csrc/cuda/ holds no kernels yet, so even when use_cuda() is true this builds the CPU
    # extension only. When the .cu files land: add csrc/cuda/*.cu and csrc/cuda/register.cpp to
    # `sources`, build a CUDAExtension instead of a CppExtension, and pass
    # extra_compile_args={"cxx": compile_args, "nvcc": ["-O3"]}.
    if use_cuda():
        print("torchprune: CUDA is available, but there are no CUDA kernels yet; "
              "building the CPU ops only")
    # ---------------------------------------------------------------------------------------------

    return [
        CppExtension(
            name="torchprune._C",
            sources=sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=sorted(glob.glob("csrc/common/*.h", root_dir=ROOT)),
            extra_compile_args={"cxx": compile_args},
            extra_link_args=link_args,
        )
    ]


setup(
    name="torchprune",
    version="0.1.0",
    description="Neural network pruning for PyTorch, with C++ masked and sparse kernels",
    packages=find_packages(include=["torchprune", "torchprune.*"]),
    python_requires=">=3.10",
    install_requires=["numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib", "tqdm"],
        "demo": ["scikit-learn", "matplotlib", "tqdm"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
