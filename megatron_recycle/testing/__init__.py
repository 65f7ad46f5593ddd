"""Running real megatron-core without a GPU, and small models to run: support for the tests,
the demo, the benchmarks and laptops. Growth itself never imports this package.

- `cpu`: the shims megatron-core needs to run on CPU over gloo (a no-op with CUDA).
- `toy`: small GPT-MoE models from megatron-core's own local specs, in any TP/EP/PP(/VPP)
  layout, and Megatron-LM-like checkpoint saving.
- `bridge_cpu`: Megatron-Bridge on CPU (its import chain, a CPU-runnable provider) and tiny
  random HF MoE models imported with Bridge.
"""
