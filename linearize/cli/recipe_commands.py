"""Plain functions behind ``linearize finetune`` and ``linearize validate`` (the Typer verbs only forward to them).

    linearize finetune recipes/stories260k/finetune.yaml [--set finetune.lr=2e-4 ...] [--no-merge] [--dry-run]
    linearize validate recipes/stories260k/finetune.yaml [--set ...]
    accelerate launch -m linearize finetune recipe.yaml          # DDP over every visible GPU
    python -m linearize.finetune recipe.yaml ...                # = `linearize finetune`, for launchers (-m)

User errors raise :class:`~linearize.errors.LinearizeError` subclasses (one line each).
"""

from __future__ import annotations

from pathlib import Path

from linearize.recipes import Recipe, check_recipe_paths, load_recipe


def validate_command(recipe: Path, overrides: list[str]) -> None:
    """Parse and validate ``recipe`` with ``overrides`` applied (``a.b=value``, YAML values); print a summary.

    Raises:
        ConfigError: every problem in the recipe (keys, types, values, paths that do not exist), in one message.
    """
    r = load_recipe(recipe, overrides)
    check_recipe_paths(r)
    print(f"{recipe}: valid. {summary(r)}")


def summary(r: Recipe) -> str:
    f, c = r.finetune, r.convert
    kind = "pure linear" if c.window == 0 else f"hybrid window {c.window}"
    steps = max(1, f.tokens // (f.batch_size * f.seq_len))
    kd = f", KD weight {f.kd.weight} T={f.kd.temperature} ({f.kd.teacher} teacher)" if f.kd and f.kd.weight else ""
    return (f"{r.model.source} -> convert ({c.feature_map}, {kind}, {c.tokens:,} tokens unless already linearized) "
            f"-> LoRA r={f.lora.rank} alpha={f.lora.alpha} on {', '.join(f.lora.target_modules or ['default q/k/v/o'])}"
            f"{' + feature maps' if f.train_feature_maps else ''}, {f.tokens:,} tokens = {steps:,} steps of "
            f"{f.batch_size}x{f.seq_len}{kd} -> {r.finetuned_dir}")


def finetune_command(recipe: Path, overrides: list[str], no_merge: bool, dry_run: bool) -> Path:
    """Run a recipe end to end and return the finished model folder (``<output>/finetuned``).

    ``dry_run`` validates, prints the plan and returns the folder without loading anything.

    Raises:
        LinearizeError: invalid recipe (ConfigError), unreadable model (ModelLoadError), bad data (DataError), or an
            existing finished export (set overwrite=true).
    """
    from linearize.io.loading import linearize_section

    r = load_recipe(recipe, overrides)
    check_recipe_paths(r)
    if dry_run:
        lin = linearize_section(r.model.source, allow_hub=False)
        stage1 = "already linearized: conversion skipped" if lin is not None else f"convert into {r.converted_dir}"
        print(f"plan: {summary(r)}\n  stage 1: {stage1}\n  export: {'base + adapter/' if no_merge else 'LoRA merged'}")
        return r.finetuned_dir
    return _run_with_progress(r, no_merge)


def _run_with_progress(r: Recipe, no_merge: bool) -> Path:
    from linearize.finetune.pipeline import run_recipe
    from linearize.run.progress import default_progress

    return run_recipe(r, no_merge=no_merge, progress=default_progress())  # progress on stderr, results on stdout
