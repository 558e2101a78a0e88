"""Triton kernels over the paged KV pool, each with a pure-torch reference."""
