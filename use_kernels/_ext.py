"""Loads the compiled library `use_kernels._C`, which registers `torch.ops.use_kernels.*`."""
import functools
import importlib

_REBUILD = ("use_kernels._C (the compiled segment-gathering ops) is missing or failed to load. "
            "Rebuild it from the repository root with:\n"
            "    pip install --no-build-isolation -e .\n"
            "(USE_CUDA=0/1 forces the CUDA build off/on; `source scripts/env.sh` does all of it).")


@functools.cache
def load_library() -> None:
    """Import `use_kernels._C` once; on failure raise ImportError saying how to rebuild."""
    try:
        importlib.import_module(f"{__package__}._C")  # loading the library registers the ops
    except ImportError as e:
        raise ImportError(f"{_REBUILD}\nOriginal error: {e}") from e


def built_with_cuda() -> bool:
    """Whether the loaded `_C` registered CUDA kernels (setup.py builds them when torch is a CUDA
    build and nvcc is found, or USE_CUDA=1)."""
    load_library()
    import torch
    return torch._C._dispatch_has_kernel_for_dispatch_key("use_kernels::gather_segments", "CUDA")
