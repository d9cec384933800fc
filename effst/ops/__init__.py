"""Fused operators: one file per op (kernels, launcher, autograd Function side by side)."""
