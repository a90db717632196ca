"""Stage 2: LoRA finetuning of linearized models (peft + accelerate), driven by recipes (``linearize.recipes``).

- ``config.py``: the stage's settings (the recipe's ``finetune`` section);
- ``lora.py``: ``apply_lora``, target checks (defaults come from each architecture's adapter);
- ``teacher.py``: the distillation teacher (shared weights + exact softmax, or a separate model);
- ``loss.py``: the loss from final hidden states, the LM head applied a chunk of rows at a time (no full logits);
- ``train.py``: the step function on the shared loop (``linearize.run.loop``) and validation loss;
- ``pipeline.py``: ``run_recipe`` (convert if needed -> finetune -> export);
- ``command.py``: ``finetune_command`` / ``validate_command`` behind the CLI verbs.
"""
