"""DeepSpeed ZeRO configs for the HF/TRL trainers, built from a stage number.

Values the Trainer also sets (batch sizes, accumulation, clipping, precision, optimizer
and scheduler settings) are "auto", so the Trainer's arguments stay the one source of
truth and DeepSpeed never disagrees with them.
"""

from __future__ import annotations

from typing import Any


def zero_config(stage: int, offload: bool = False) -> dict[str, Any] | None:
    """The DeepSpeed config for ZeRO ``stage`` (0-3); None for stage 0 means plain DDP."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 0:
        return None
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        # gather the full weights when saving, so the output is a plain HF model folder
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload and stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }
