"""Parameter-efficient fine-tuning stages on the SpUNet and PTv3 (SPEC §8).

- ``frozen_conv``: frozen sparse convolutions that compute only the input gradient (every
  spconv algorithm).
- ``frozen_norm``: frozen BatchNorm / PDNorm as a constant per-channel scale-and-shift.
- ``adapters``: bottleneck adapter, weight-free gated prompt attention, per-scene scatter ops.
- ``dapt`` / ``point_peft``: the per-block modules of the two PEFT stages (SpUNet blocks).
- ``ptv3_block`` / ``ptv3_dapt`` / ``ptv3_point_peft``: the same stages on PTv3 transformer
  blocks (adapter beside the MLP, prompts as per-scene attention keys/values).
- ``memory_bank``: Point-PEFT's point-prior bank (build, retrieval).
- ``stages``: apply a stage (full / linear / bitfit / dapt / pointpeft) to a Segmentor.

PEFT checkpoints, base-weight mapping and building the bank from training scenes are engine work:
``ppt.engine.peft_checkpoint`` and ``ppt.engine.weights``.

Run a stage: ``tools/train.sh --peft dapt --weights exp/<base>/model/model_best.pth --datasets s3dis``.
"""
from ppt.models.peft.frozen_conv import freeze_sparse_conv, freeze_sparse_convs
from ppt.models.peft.frozen_norm import freeze_norms
from ppt.models.peft.memory_bank import MemoryBank, build_memory_bank
from ppt.models.peft.stages import STAGES, apply_stage, parameter_counts

__all__ = ["STAGES", "MemoryBank", "apply_stage", "build_memory_bank", "freeze_norms",
           "freeze_sparse_conv", "freeze_sparse_convs", "parameter_counts"]
