"""probprune's benchmarks (part of the checkout, not of the installed package).

``python -m bench --out DIR [--quick]`` from the checkout's root runs the harness
(:mod:`bench.harness`); ``pytest bench/`` runs the same cases through pytest-benchmark;
``bash bench/gpu_check.sh OUTDIR`` builds and checks the CUDA backend on a GPU and runs the GPU
micro-benchmarks.
"""
