"""Benchmarks (not tests): ``op`` is ``longnet bench`` (dilated vs dense attention), ``lm`` its
``--lm`` mode (language-model training throughput), ``sp`` the
sequence-parallel weak scaling, ``triton_kernel`` the Triton kernel on a GPU; ``common`` holds
their shared timing, memory, CSV, table and plot code. Nothing is imported here: each module
loads only when it runs."""
