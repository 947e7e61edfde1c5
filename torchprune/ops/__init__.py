"""The op layer: torchprune's C++ ops, loaded, with typed Python wrappers and fake kernels.

The ops live under ``torch.ops.torchprune``; their schemas are in ``csrc/torchprune.cpp``, their
CPU kernels in ``csrc/cpu/``, their CUDA kernels in ``csrc/cuda/`` and their autograd in
``csrc/autograd/`` (in C++, so that a masked layer runs no Python; each backward is itself an op, so
compiled backward graphs see it too; higher derivatives go through differentiable ATen ops). This
package adds what the C++ side does not have, one module per op family, each op's wrapper directly
above its fake kernel:

* masked.py: :func:`masked_linear`, :func:`masked_conv2d` (a weight times its bool mask);
* csr.py: :func:`pack_csr`, :func:`unpack_csr`, :func:`check_csr`, :func:`sparse_linear`,
  :func:`sparse_conv2d` (weights packed as CSR);
* bsr.py: :func:`pack_bsr`, :func:`unpack_bsr`, :func:`check_bsr`, :func:`block_sparse_linear`
  (weights packed in R x 1 blocks);
* nm.py: :func:`pack_nm`, :func:`unpack_nm`, :func:`check_nm`, :func:`nm_sparse_linear` (weights
  with n entries in every group of 8 input columns: 2:4 and other N:M);
* compact.py: :func:`compact` (the index_select behind structured pruning);
* devices.py: which devices this build has kernels for.

The fake kernels (``torch.library.register_fake``) give output shapes and strides without running
the kernel, so ``torch.compile(fullgraph=True)`` and ``torch.export`` trace straight through the ops.
Every op validates its arguments in C++; the fakes repeat the checks that decide output shapes, with
the same messages, so a bad call fails the same way while tracing. Each schema fragment in
``csrc/torchprune.cpp`` names the module here that holds its fakes (``m.set_python_module``).

This is the lowest floor of the package: it imports nothing else from torchprune.
"""

import torch  # noqa: F401  (loads libtorch, which _C links against)

try:
    from .. import _C  # noqa: F401  (loading the library registers the ops in torch.ops.torchprune)
except ImportError as error:  # pragma: no cover - depends on how the package was installed
    raise ImportError(
        "torchprune's C++ ops (torchprune._C) could not be loaded: they are not built, or were "
        "built against a different PyTorch. Build them against the torch you have, from the "
        'repository root: pip install --no-build-isolation -e ".[test]"  (or, for the ops only: '
        f"python setup.py build_ext --inplace). Original error: {error}"
    ) from error

from . import devices
from .bsr import block_pattern_rows, block_sparse_linear, check_bsr, pack_bsr, unpack_bsr
from .compact import compact
from .csr import check_csr, pack_csr, sparse_conv2d, sparse_linear, unpack_csr
from .masked import masked_conv2d, masked_linear
from .nm import check_nm, nm_slots, nm_sparse_linear, pack_nm, unpack_nm

__all__ = [
    "masked_linear",
    "masked_conv2d",
    "pack_csr",
    "unpack_csr",
    "check_csr",
    "sparse_linear",
    "sparse_conv2d",
    "pack_bsr",
    "unpack_bsr",
    "check_bsr",
    "block_sparse_linear",
    "block_pattern_rows",
    "pack_nm",
    "unpack_nm",
    "check_nm",
    "nm_sparse_linear",
    "nm_slots",
    "compact",
    "devices",
]
