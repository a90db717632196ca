"""Stage 2: LoRA finetuning of linearized models (peft + accelerate), driven by recipes (``linearize.recipes``).

- ``lora.py``: target defaults per architecture, ``apply_lora``;
- ``teacher.py``: the distillation teacher (shared weights + exact softmax, or a separate model);
- ``train.py``: the training loop, checkpoints (safetensors + JSON) and validation loss;
- ``pipeline.py``: ``run_recipe`` (convert if needed -> finetune -> export);
- ``command.py``: ``finetune_command`` / ``validate_command`` for the CLI.
"""

from linearize.finetune.command import finetune_command, validate_command

__all__ = ["finetune_command", "validate_command"]
