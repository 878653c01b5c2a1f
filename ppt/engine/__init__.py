"""Training engine: builders, the loop, checkpoints, distributed helpers, logging, evaluation.

Modules are imported where used (``from ppt.engine.trainer import train``) so that importing
``ppt.engine`` stays cheap.
"""
