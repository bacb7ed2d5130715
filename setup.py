"""Builds `use_kernels._C`: the segment-gathering ops (CPU always, CUDA when available).

CUDA is decided by `USE_CUDA` (0/1, default auto) + torch being a CUDA build + nvcc being found,
never by whether a GPU is attached: a GPU-less build box still builds and compile-checks CUDA.
`TORCH_CUDA_ARCH_LIST` is honoured (default "9.0"); `DEBUG=1` builds with -O0 -g.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"[use_kernels build] {msg}", file=sys.stderr)


def _ext_modules():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std here: torch's BuildExtension adds the standard its headers need (C++17 or C++20).
    cxx = opt + ["-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    want = os.environ.get("USE_CUDA", "auto").lower()
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_nvcc = bool(nvcc) and os.path.exists(nvcc)
    torch_cuda = torch.version.cuda is not None
    if want in ("1", "true", "yes"):
        if not (torch_cuda and have_nvcc):
            raise RuntimeError(
                f"USE_CUDA=1 but torch is {'a CUDA' if torch_cuda else 'a CPU-only'} build and nvcc "
                f"{'was found' if have_nvcc else 'was not found'}; both are needed for the CUDA ops."
            )
        use_cuda = True
    elif want in ("0", "false", "no"):
        use_cuda = False
    else:
        use_cuda = torch_cuda and have_nvcc and bool(cuda_sources)

    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        _log(f"building CPU + CUDA ops (arch {os.environ['TORCH_CUDA_ARCH_LIST']}, nvcc {nvcc})")
        ext = CUDAExtension(
            "use_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("USE_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": opt + ["--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        why = ("USE_CUDA=0" if want in ("0", "false", "no")
               else "torch is a CPU-only build" if not torch_cuda
               else "nvcc not found" if not have_nvcc else "no CUDA sources")
        _log(f"building CPU ops only ({why}); the CPU build is complete on its own")
        ext = CppExtension(
            "use_kernels._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
