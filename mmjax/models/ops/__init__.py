"""Kernels of the mmjax layers, apart from the Flax modules that own the parameters.

  policy       `KernelPolicy`: the platform matmuls are lowered for and the
               dtype of parameter-gradient reductions, set while tracing
               (`kernel_policy`; the trainer sets it from its mesh)
  matmul       `linear` / `matmul_2d` (every projection and MLP), the CPU
               low-precision GEMM path and the float32-dW path
  norm         LayerNorm and RMSNorm with float32 statistics (closed-form
               LayerNorm backward)
  activations  GELU variants and the table of activations by config name
  attention    masks and scaled dot-product attention (heads-major einsums,
               or `jax.nn.dot_product_attention`'s fused kernels)
  tpu_attention  the Pallas splash-attention kernel on TPU (`attention="splash"`):
               key-padding / causal masks, GQA, block padding, shard_map

Every kernel reads the active policy, never the host's default backend, so a
step compiled for an accelerator from a CPU host takes the accelerator's path.
Speed figures behind these choices: benchmarks/cpu_train_step.py and BENCHMARKS.md.
"""
