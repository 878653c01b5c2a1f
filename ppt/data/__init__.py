"""Data pipeline: scene readers, synthetic rooms, transforms, voxel grids, batching, mixing.

Kept import-light on purpose: import the submodule you need (``ppt.data.transforms`` ...).
"""
