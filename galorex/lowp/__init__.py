"""Low-precision operations shared by HALO's layers (``galorex.halo``) and the optimizers.

- :mod:`.hadamard`: Sylvester matrices, block rotations with optional random signs, the FWHT;
- :mod:`.quant`: scaled FP8 (e4m3/e5m2) and INT8 quantisation, per tensor or per row;
- :mod:`.gemm`: the scaled GEMM (Triton, ``torch._scaled_mm`` / ``torch._int_mm``, or the reference);
- :mod:`.projection`: low-precision GaLore projections (the ``proj_precision`` group key).

Each operation has one torch reference, the twin of its Triton kernel in ``triton_kernels``
(``hadamard_transform_reference``, ``quantize_reference``, ``scaled_gemm_reference``; the fused
GaLore-Adam step's is ``fused_galore_adam_step_reference``), and one function decides between the
kernel and the torch path: ``triton_kernels.select_backend``. On CUDA that is torch by default until
a GPU run has shown a kernel correct and faster; ``GALOREX_BACKEND=triton`` runs the kernels, and
raises where they cannot run. Layering: ``triton_kernels`` (knows nothing of galorex) ←
``galorex.lowp`` ← ``galorex.halo`` and ``galorex.optim``.
"""
