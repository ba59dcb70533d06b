__version__ = "0.1.0"

# Same numbers on every CPU kind: the math libraries pick their kernels by the CPU's instruction set (AVX-512, AMX),
# and different kernels sum in different orders, so the last bits of a model's scores, and at a near-tie a label,
# an abstraction or an action, would follow the machine. Pinning their code paths to AVX2, which every x86-64 CPU
# of this project's machines runs, makes float32 results bit-identical across them (nbs/02b_llm.ipynb measures it).
# They are read when torch and its libraries load, so this must run before `import torch`; set any of them in the
# environment to choose otherwise (e.g. on a GPU, where they do not apply). OpenBLAS (numpy's and scipy's BLAS, under
# the reward approximators) picks its kernels by CPU model too (Haswell, Zen, SkylakeX, ...): OPENBLAS_CORETYPE pins
# it; it is read when numpy loads, so the Makefile exports it for every stage (here it only covers a later import).
import os as _os
for _k, _v in {'MKL_CBWR': 'AVX2', 'ATEN_CPU_CAPABILITY': 'avx2', 'ONEDNN_MAX_CPU_ISA': 'AVX2',
               'OPENBLAS_CORETYPE': 'Haswell'}.items(): _os.environ.setdefault(_k, _v)
del _os, _k, _v
