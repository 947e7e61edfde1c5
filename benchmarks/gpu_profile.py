"""The calls that gpu_check.sh hands to Nsight Compute: sparse_linear and the dense F.linear
(cuBLAS) on one layer at the small batches where the GPU targets are set, fp32 and fp16.

Each call runs twice, the first time as its warm-up, so that the profile of the second one is the
steady state. All inputs are made on the CPU and copied, so that the only kernels launched are the
products themselves (and whatever they launch), which keeps `ncu --launch-count` small.

    ncu --clock-control none --section SpeedOfLight python benchmarks/gpu_profile.py
    python benchmarks/gpu_profile.py --shapes 4096x4096,1536x384 --batches 1,16,64 --sparsity 0.9
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_linear import batch_list, shape_list  # noqa: E402

from torchprune import ops  # noqa: E402

from _common import random_mask  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", type=shape_list, default=[(4096, 4096)], help="OUTxIN[,OUTxIN...] weights")
    parser.add_argument("--batches", type=batch_list, default=[1, 16, 64], help="rows M of x, comma-separated")
    parser.add_argument("--sparsity", type=float, default=0.9)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator().manual_seed(0)
    for shape in args.shapes:
        weight = torch.randn(shape, generator=generator)
        weight[~random_mask(shape, args.sparsity, generator)] = 0.0
        row_ptr, col_idx, values = ops.pack_csr(weight)
        for dtype in (torch.float32, torch.float16):
            w = weight.to(dtype).cuda()
            packed = (row_ptr.cuda(), col_idx.cuda(), values.to(dtype).cuda())
            for batch in args.batches:
                x = torch.randn(batch, shape[1], generator=generator).to(dtype).cuda()
                for name, call in (("sparse_linear", lambda: ops.sparse_linear(x, *packed, shape[1])),
                                   ("F.linear", lambda: F.linear(x, w))):
                    for _ in range(2):
                        call()
                    torch.cuda.synchronize()
                    print(f"profiled: {name} {shape[0]}x{shape[1]} M={batch} {str(dtype)[6:]}", flush=True)


if __name__ == "__main__":
    main()
