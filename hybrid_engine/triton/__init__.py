"""Triton kernels, one module per op family, each with a host function of the op's contract.

Imported on demand by hybrid_engine.ops (backend "triton"); on a machine without a GPU they run
under TRITON_INTERPRET=1, which must be set before this package is first imported.
"""
