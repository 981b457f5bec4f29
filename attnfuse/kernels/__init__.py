"""Fused ops of attnfuse.

`reference` is the plain-torch specification of every op. `triton` holds the GPU
kernels and imports Triton; nothing here imports it, so CPU users without Triton
can use `attnfuse.kernels.reference`.
"""
