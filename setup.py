"""Builds latentfast._C, the C++ CPU kernels, from csrc/.

Set LATENTFAST_BUILD_EXT=0 to install pure Python (reference and Triton backends only).
Install with `pip install --no-build-isolation -e .` after torch, so the extension is
compiled against the torch that will load it.
"""
import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("LATENTFAST_BUILD_EXT", "1") != "0":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug_info = [] if os.environ.get("LATENTFAST_DEBUG_INFO", "0") == "1" else ["-g0"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*.cpp"))
    ext_modules.append(
        CppExtension(
            "latentfast._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            # fp-contract: a*b+c as one FMA in the AVX2 clones; no-trapping-math: lets GCC
            # if-convert and vectorise the branch-free sigmoid/log loops (no FP traps are used);
            # no-math-errno: sqrt as a vector instruction (errno is never read; torch builds
            # with it too).
            # -g0: Python's CFLAGS carry -g, and the debug information for torch's headers takes
            # about 40% of the compile time (and 90% of the object size);
            # LATENTFAST_DEBUG_INFO=1 keeps it.
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math",
                                "-fno-math-errno"] + debug_info,
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
