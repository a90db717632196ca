"""Recipes: one YAML file that takes a checkpoint to a finished linear-attention model.

A recipe has five sections (``model``, ``convert``, ``finetune``, ``eval``) plus ``output``, ``seed`` and
``overwrite``; see ``docs/recipes.md`` (generated from this file by :func:`reference_markdown`) for every key.
``load_recipe`` reads the YAML, applies ``--set a.b=value`` overrides (values parsed as YAML), validates the result
with pydantic (unknown keys are errors) and then with the library's own config classes
(:class:`~linearize.modules.attention.LinearAttentionConfig`, :class:`~linearize.convert.transfer.TransferConfig`),
and raises **one** :class:`~linearize.errors.ConfigError` listing every problem by key path.

Relative paths (``model.source``, ``convert.data``, ``finetune.data``, ``eval.text``, ``output``) are resolved
against the current working directory, not the recipe's folder: the recipes in ``recipes/`` are written to be
launched from the repository root.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from linearize.convert.transfer import TransferConfig
from linearize.errors import ConfigError
from linearize.modules.attention import LinearAttentionConfig

_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

_LA, _TC = LinearAttentionConfig, TransferConfig  # defaults below come from the library's config classes


class ModelSpec(BaseModel):
    """The starting checkpoint. A bare string is accepted as ``source``."""

    model_config = _CONFIG

    source: str
    """Hub id, local folder, or .gguf file. A softmax teacher is converted first; a folder holding a linearized
    export (config.json with a ``linearize`` section) is finetuned directly."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weight dtype: auto = bfloat16 on CUDA, float32 on CPU."""
    device: str | None = None
    """cpu | cuda | cuda:N (default: the accelerator's device; under ``accelerate launch`` one GPU per process)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"source": v} if isinstance(v, str) else v


class ConvertSection(BaseModel):
    """Attention transfer (stage 1); mirrors ``linearize convert``. Ignored when the model is already linearized."""

    model_config = _CONFIG

    feature_map: str = _LA.feature_map
    """hedgehog | based | t2r | elu | performer."""
    window: int = _LA.window
    """Sliding softmax window in tokens (query included); 0 = pure linear attention."""
    softmax_layers: list[int] = Field(default_factory=list)
    """Layer indices that keep their softmax attention."""
    state_per: Literal["kv", "query"] = _LA.state_per
    """Recurrent state per kv head (phi_k shared in a GQA group; smaller) or per query head (LoLCATs)."""
    proj_dim: int | None = _LA.proj_dim
    """Feature-map projection size (hedgehog: per half, default head_dim; based: 16)."""
    mix_init: float = _LA.mix_init
    """Initial weight gamma of the window softmax against the linear part (hybrid only)."""
    backend: str = _LA.backend
    """Kernel backend: auto | torch | triton."""
    data: str | None = None
    """Calibration text (file, folder or dataset name); null = text sampled from the teacher."""
    tokens: int = Field(200_000, ge=0)
    """Transfer training tokens (0 = export the untrained map)."""
    seq_len: int = Field(256, gt=0)
    """Tokens per transfer sequence."""
    val_tokens: int | None = Field(None, gt=0)
    """Held-out tokens for the transfer report (default 5% of tokens)."""
    loss: Literal["mse", "xent", "both"] = _TC.loss
    """mse (attention outputs, LoLCATs) | xent (attention weights, Hedgehog) | both."""
    mse_scale: float = _TC.mse_scale
    """Multiplier on the MSE term."""
    xent_block: int = _TC.xent_block
    """Query rows per block of the cross-entropy loss (memory O(block * T))."""
    lr: float = _TC.lr
    """Peak AdamW learning rate of the feature maps."""
    weight_decay: float = _TC.weight_decay
    warmup_frac: float = _TC.warmup_frac
    """Fraction of steps of linear warmup, then cosine decay."""
    min_lr_frac: float = _TC.min_lr_frac
    """Final learning rate as a fraction of ``lr``."""
    batch_size: int = _TC.batch_size
    """Sequences per step."""
    grad_clip: float = _TC.grad_clip
    """Gradient-norm clip (0 = off)."""
    checkpoint_every: int = _TC.checkpoint_every
    """Steps between resumable checkpoints (0 = only when interrupted with Ctrl-C)."""

    def attention_config(self) -> LinearAttentionConfig:
        return LinearAttentionConfig(
            feature_map=self.feature_map, proj_dim=self.proj_dim, window=self.window,
            softmax_layers=list(self.softmax_layers), state_per=self.state_per, mix_init=self.mix_init,
            backend=self.backend,
        )

    def transfer_config(self, seed: int) -> TransferConfig:
        return TransferConfig(
            loss=self.loss, mse_scale=self.mse_scale, lr=self.lr, weight_decay=self.weight_decay,
            warmup_frac=self.warmup_frac, min_lr_frac=self.min_lr_frac, batch_size=self.batch_size,
            grad_clip=self.grad_clip, xent_block=self.xent_block, checkpoint_every=self.checkpoint_every, seed=seed,
        )


class LoraSection(BaseModel):
    """LoRA adapters (peft) on the linearized model."""

    model_config = _CONFIG

    rank: int = Field(8, gt=0)
    """LoRA rank r (LoLCATs: 8)."""
    alpha: float = Field(16.0, gt=0)
    """LoRA scaling numerator; the update is (alpha / rank) * B @ A (LoLCATs: 16)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input (LoLCATs: 0)."""
    target_modules: list[str] | None = None
    """Module names to adapt; null = the attention projections of the architecture (llama/mistral/qwen2:
    q_proj, k_proj, v_proj, o_proj; gpt2: attn.c_attn, attn.c_proj)."""


class KDSection(BaseModel):
    """Distillation from the teacher's next-token distribution, added to the next-token loss."""

    model_config = _CONFIG

    weight: float = Field(0.5, ge=0, le=1)
    """loss = (1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T)."""
    temperature: float = Field(1.0, gt=0)
    """Softening temperature T of both distributions."""
    teacher: Literal["shared", "separate"] = "shared"
    """shared: the student's own frozen base weights with exact softmax attention and LoRA disabled (no extra
    memory; one more forward per step). separate: load the original teacher as a second model (one more copy of
    the weights, e.g. +16 GB for an 8B model in bf16)."""


class FinetuneSection(BaseModel):
    """Stage 2: LoRA finetuning of the linearized model (next-token loss, optional distillation)."""

    model_config = _CONFIG

    lora: LoraSection = Field(default_factory=LoraSection)
    train_feature_maps: bool = False
    """Also train the feature maps and mix factors (``*.linear_attn.*``); LoLCATs keeps them frozen."""
    data: str | None = None
    """Training text or instruction data (file, folder or dataset name; chat template applied where the
    tokenizer has one); null = text sampled from the teacher."""
    chat_template: bool | None = None
    """Render instruction/chat records with the tokenizer's chat template; null = when the tokenizer has one."""
    tokens: int = Field(1_000_000, gt=0)
    """Training tokens (one pass); steps = tokens // (batch_size * seq_len)."""
    seq_len: int = Field(1024, gt=0)
    """Tokens per packed training sequence."""
    val_tokens: int | None = Field(None, gt=0)
    """Held-out tokens for validation loss before/after (default 5% of tokens, at least 4 sequences)."""
    batch_size: int = Field(8, gt=0)
    """Sequences per optimizer step, summed over all processes."""
    micro_batch_size: int | None = Field(None, gt=0)
    """Sequences per forward on each process (gradient accumulation); default: batch_size / processes."""
    lr: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate (LoLCATs: 1e-4)."""
    weight_decay: float = Field(0.0, ge=0)
    warmup: float = Field(0.05, ge=0, lt=1)
    """Fraction of steps of linear warmup."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    min_lr_frac: float = Field(0.1, ge=0, le=1)
    """Final learning rate as a fraction of ``lr`` (cosine and linear)."""
    grad_clip: float = Field(1.0, ge=0)
    """Gradient-norm clip (0 = off)."""
    kd: KDSection | None = None
    """Distillation from the teacher's logits; null = plain next-token loss."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    checkpoint_every: int = Field(100, ge=0)
    """Steps between resumable checkpoints (0 = only when interrupted with Ctrl-C; with several processes Ctrl-C
    stops at once and resumes from the last periodic checkpoint)."""
    eval_batch_size: int = Field(8, gt=0)
    """Sequences per forward when measuring validation loss."""


class EvalSection(BaseModel):
    """Extra perplexity on a raw text file, for teacher, transfer-only and finetuned model."""

    model_config = _CONFIG

    text: str | None = None
    """Raw text file (e.g. WikiText-103 wiki.valid.raw); null = no extra evaluation."""
    seq_len: int = Field(1024, gt=0)
    """Tokens per non-overlapping block."""
    max_tokens: int | None = Field(None, gt=0)
    """Score only the first N tokens."""
    batch_size: int = Field(8, gt=0)


class Recipe(BaseModel):
    """A whole run: checkpoint -> attention transfer -> LoRA finetuning -> export."""

    model_config = _CONFIG

    model: ModelSpec
    convert: ConvertSection = Field(default_factory=ConvertSection)
    finetune: FinetuneSection = Field(default_factory=FinetuneSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output: str
    """Run folder: ``<output>/converted`` (stage 1 export) and ``<output>/finetuned`` (the finished model)."""
    seed: int = 0
    """Seeds data order, LoRA init, dropout and transfer."""
    overwrite: bool = False
    """Replace a finished export / discard an unfinished run with different settings."""

    # -- derived paths ---------------------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def converted_dir(self) -> Path:
        return self.output_dir / "converted"

    @property
    def finetuned_dir(self) -> Path:
        return self.output_dir / "finetuned"


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> schema -> library config classes, every problem in one ConfigError
# ---------------------------------------------------------------------------------------------------------------
def parse_overrides(raw: dict[str, Any], overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a copy of ``raw``; returns (data, problems)."""
    data = _deepcopy(raw)
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        parts = key.split(".")
        if not sep or not key or any(not p for p in parts):
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. finetune.lr=2e-4")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"--set {key}: value {text!r} is not valid YAML ({_yaml_problem(e)}); quote strings")
            continue
        node = data
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"--set {key}: `{where}` is a value ({child!r}), not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    return data, problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or any key is unknown, mistyped or
            out of range — all problems in one message, by key path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found (pass a YAML file, e.g. recipes/stories260k/finetune.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return validate_recipe(raw, overrides or [], origin=str(path))


def validate_recipe(raw: dict[str, Any], overrides: list[str], origin: str = "recipe") -> Recipe:
    data, problems = parse_overrides(raw, overrides)
    recipe = None
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems.extend(_describe_errors(e))
    if recipe is not None:
        problems.extend(_semantic_problems(recipe))
    if problems:
        raise ConfigError(f"{origin}: " + "; ".join(problems))
    return recipe


def _semantic_problems(r: Recipe) -> list[str]:
    """Checks that need more than one field, or the library's own config classes."""
    out = []
    for build, section in ((r.convert.attention_config, "convert"), (lambda: r.convert.transfer_config(r.seed), "convert")):
        try:
            build()
        except ConfigError as e:
            out.extend(f"convert.{p.strip()}" for p in str(e).split(";"))
    f = r.finetune
    if f.tokens < f.seq_len * f.batch_size:
        out.append(f"finetune.tokens={f.tokens:,} is less than one step (batch_size * seq_len = "
                   f"{f.batch_size * f.seq_len:,}); raise finetune.tokens or lower finetune.batch_size")
    if f.micro_batch_size is not None and f.batch_size % f.micro_batch_size:
        out.append(f"finetune.micro_batch_size={f.micro_batch_size} must divide finetune.batch_size={f.batch_size}")
    if f.lora.target_modules is not None and not f.lora.target_modules:
        out.append("finetune.lora.target_modules is empty; list module names or use null for the defaults")
    if not r.output.strip():
        out.append("output is empty; give a run folder, e.g. runs/my-model")
    return out


def _describe_errors(e: ValidationError) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for err in e.errors():
        loc = [p for p in err["loc"] if isinstance(p, int) or not any(c in str(p) for c in "[-")]
        path = ".".join(str(p) for p in loc)
        parent, key = loc[:-1], loc[-1] if loc else ""
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(parent)
            guess = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean `{'.'.join([*map(str, parent), guess[0]])}`?)" if guess else ""
            where = f"`{'.'.join(map(str, parent))}`" if parent else "the top level"
            msg = f"unknown key `{path}`{hint}; valid keys in {where}: {', '.join(valid)}"
        elif err["type"] == "missing":
            msg = f"missing required key `{path}`"
        else:
            text = err["msg"]
            text = text[0].lower() + text[1:]
            msg = f"`{path}`: {text} (got {err['input']!r})"
        if msg not in seen:
            seen.add(msg)
            out.append(msg)
    return out


def _valid_keys(parent: list) -> list[str]:
    cls: type[BaseModel] = Recipe
    for part in parent:
        if isinstance(part, int):
            continue
        ann = cls.model_fields[part].annotation
        sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not sub:
            return []
        cls = sub[0]
    return list(cls.model_fields)


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    mark = getattr(e, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


# ---------------------------------------------------------------------------------------------------------------
# Reference documentation, generated from the schema (docs/recipes.md embeds it; a test keeps it current)
# ---------------------------------------------------------------------------------------------------------------
SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("model", ModelSpec), ("convert", ConvertSection), ("finetune", FinetuneSection),
    ("finetune.lora", LoraSection), ("finetune.kd", KDSection), ("eval", EvalSection), ("(top level)", Recipe),
]


def reference_markdown() -> str:
    """Markdown tables of every recipe key: type, default, description."""
    lines = []
    for name, cls in SECTIONS:
        lines += [f"### `{name}`", "", (cls.__doc__ or "").strip(), "", "| key | type | default | meaning |",
                  "| --- | --- | --- | --- |"]
        for key, field in cls.model_fields.items():
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                continue  # nested sections get their own table
            if field.is_required():
                default = "required"
            else:
                value = field.get_default(call_default_factory=True)
                default = "null" if value is None else f"`{value}`" if not isinstance(value, BaseModel) else "section"
            typ = _type_name(field.annotation)
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            lines.append(f"| `{key}` | {typ} | {default} | {desc} |")
        lines.append("")
    return "\n".join(lines)


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return " \\| ".join(str(a) for a in get_args(ann))
    if get_origin(ann) in (Union, UnionType):
        return " or ".join(_type_name(a) for a in get_args(ann)).replace("NoneType", "null")
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", None) if isinstance(ann, type) and get_origin(ann) is None else str(ann)


__all__ = [
    "ConvertSection", "EvalSection", "FinetuneSection", "KDSection", "LoraSection", "ModelSpec", "Recipe",
    "load_recipe", "parse_overrides", "reference_markdown", "validate_recipe",
]


if __name__ == "__main__":  # regenerate the reference section of docs/recipes.md
    print(reference_markdown())


def check_recipe_paths(recipe: Recipe) -> None:
    """The recipe's paths, checked before any work (``linearize validate`` included): ``model.source`` and data
    paths exist (a hub id or dataset name is taken as such), ``eval.text`` is a file, ``output`` can be written.

    Raises:
        ConfigError: every missing or unusable path, by key, in one message.
    """
    from linearize.data import _looks_like_path
    from linearize.export import output_path_problem

    problems = []
    src = Path(recipe.model.source).expanduser()
    if not src.exists() and (_looks_like_path(recipe.model.source) or src.suffix == ".gguf"):
        problems.append(f"model.source: {recipe.model.source} does not exist (relative paths start at {Path.cwd()})")
    for key, value in (("convert.data", recipe.convert.data), ("finetune.data", recipe.finetune.data)):
        if value and _looks_like_path(str(value)) and not Path(str(value)).expanduser().exists():
            problems.append(f"{key}: {value} does not exist (relative paths start at {Path.cwd()})")
    if recipe.eval.text and not Path(recipe.eval.text).expanduser().is_file():
        problems.append(f"eval.text: {recipe.eval.text} is not a file (relative paths start at {Path.cwd()})")
    problem = output_path_problem(Path(recipe.output))
    if problem:
        problems.append(f"output: {problem}")
    if problems:
        raise ConfigError("recipe paths: " + "; ".join(problems))
