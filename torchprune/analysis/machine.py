"""What machine a measurement ran on: the CPU model and its vector units, threads, library versions.

Benchmarks and ``python -m torchprune compress`` print it beside every timing: the same model name
("AMD EPYC") covers a Zen 3 with AVX2 only and a Zen 4 with AVX-512, and the kernels differ.
"""

from __future__ import annotations

import platform
from typing import Dict

import torch

__all__ = ["cpu_fields", "vector_isa", "machine_info", "describe"]


def cpu_fields() -> Dict[str, str]:
    """The first CPU's /proc/cpuinfo fields (empty off Linux)."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def vector_isa(flags: str) -> str:
    """The widest vector units the kernels can use, from the cpuinfo flags: the same model name
    ("AMD EPYC") covers a Zen 3 with AVX2 only and a Zen 4 with AVX-512, and the kernels differ."""
    have = set(flags.split())
    if "avx512f" in have:
        return "AVX-512" + (" + AMX" if "amx_tile" in have else "")
    return "AVX2" if "avx2" in have else "no AVX2"


def machine_info() -> dict:
    """CPU model (name, family/model, vector ISA), torch threads and library versions: what a
    reader needs to compare a table."""
    fields = cpu_fields()
    cpu = fields.get("model name") or platform.processor() or platform.machine()
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}
    if "cpu family" in fields:
        info["cpu_id"] = f"family {fields['cpu family']} model {fields.get('model', '?')}"
        info["isa"] = vector_isa(fields.get("flags", ""))
    try:
        import numpy

        info["numpy"] = numpy.__version__
        blas = numpy.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}".strip()
    except Exception:  # numpy missing, or an old numpy without mode="dicts"
        pass
    return info


def describe(info: dict) -> str:
    cpu = info["cpu"] + (f" ({info['cpu_id']}, {info['isa']})" if "cpu_id" in info else "")
    text = f"{cpu}, {info['threads']} threads, torch {info['torch']}"
    if "numpy" in info:
        text += f", numpy {info['numpy']} ({info.get('numpy_blas', '?')})"
    return text
