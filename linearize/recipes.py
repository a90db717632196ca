"""Recipes: one YAML file that takes a checkpoint to a finished linear-attention model.

A recipe has four sections (``model``, ``convert``, ``finetune``, ``eval``) plus ``output``, ``seed`` and
``overwrite``; see ``docs/recipes.md`` (generated from this file by :func:`reference_markdown`) for every key.
The sections are the stages' own settings classes, not copies: ``model`` is
:class:`~linearize.io.sources.ModelSpec`, ``convert`` is :class:`~linearize.convert.config.ConvertConfig` (the same
fields as ``linearize convert``'s flags), ``finetune`` is :class:`~linearize.finetune.config.FinetuneConfig`.
``load_recipe`` reads the YAML, applies ``--set a.b=value`` overrides (values parsed as YAML), validates the result
(unknown keys are errors) and raises **one** :class:`~linearize.errors.ConfigError` listing every problem by key
path.

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
from pydantic import BaseModel, Field, ValidationError

from linearize.convert.config import ConvertConfig
from linearize.errors import ConfigError, LinearizeError
from linearize.finetune.config import DistillConfig, FinetuneConfig, LoRAConfig
from linearize.io.sources import ModelSpec, data_sources, looks_like_path
from linearize.settings import Settings


class EvalSection(Settings):
    """Extra perplexity on a raw text file, for teacher, transfer-only and finetuned model."""

    text: str | None = None
    """Raw text file (e.g. WikiText-103 wiki.valid.raw); null = no extra evaluation."""
    seq_len: int = Field(1024, gt=0)
    """Tokens per non-overlapping block (at most the model's context: a longer one is clamped, with a log line)."""
    max_tokens: int | None = Field(None, gt=0)
    """Score only the first N tokens."""
    batch_size: int = Field(8, gt=0)


class Recipe(Settings):
    """A whole run: checkpoint -> attention transfer -> LoRA finetuning -> export."""

    model: ModelSpec
    convert: ConvertConfig = ConvertConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalSection = EvalSection()
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
        ConfigError: the file is missing, unreadable, not UTF-8 text or not YAML, an override is malformed, or any key
            is unknown, mistyped or out of range — all problems in one message, by key path.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} not found (pass a YAML file, e.g. recipes/stories260k/finetune.yaml)")
    try:
        raw = yaml.safe_load(_recipe_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return validate_recipe(raw, overrides or [], origin=str(path))


def _recipe_text(path: Path) -> str:
    """A recipe file's text: UTF-8 (or UTF-16 with its byte-order mark), the encodings YAML allows; anything else is
    one ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read recipe {path}: {e.strerror or e}") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):  # a UTF-16 byte-order mark: text, as YAML allows
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError:
            pass
    if b"\0" in raw:
        raise ConfigError(f"recipe {path} is a binary file, not YAML text; pass a recipe such as "
                          "recipes/stories260k/finetune.yaml")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}); save it as "
                          "UTF-8") from None


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
    """Checks that need more than one field."""
    out = r.finetune.problems()
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
        elif err["type"] == "value_error":  # the settings classes' own checks: "convert.window=-1 must be >= 0"
            msg = f"{path}={err['input']!r} {err['msg'].removeprefix('Value error, ')}"
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
    ("model", ModelSpec), ("convert", ConvertConfig), ("finetune", FinetuneConfig),
    ("finetune.lora", LoRAConfig), ("finetune.kd", DistillConfig), ("eval", EvalSection), ("(top level)", Recipe),
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


__all__ = ["EvalSection", "Recipe", "load_recipe", "parse_overrides", "reference_markdown", "validate_recipe"]


def check_recipe_paths(recipe: Recipe) -> None:
    """The recipe's paths, checked before any work (``linearize validate`` included): ``model.source`` and data
    paths exist (a hub id or dataset name is taken as such; ``convert.data`` only when stage 1 runs, i.e. the
    source is not a linearized export) and data can be read (``data.records.check_data_source``: readable files,
    pyarrow for parquet, datasets for a dataset name), ``eval.text`` is a UTF-8 text file, ``output`` can be
    written.

    Raises:
        ConfigError: every missing or unusable path, by key, in one message.
    """
    import importlib.util

    from linearize.data.records import check_data_source
    from linearize.export.writer import check_export_folder, output_path_problem

    problems = []
    src = Path(recipe.model.source).expanduser()
    if not src.exists() and looks_like_path(recipe.model.source):
        problems.append(f"model.source: {recipe.model.source} does not exist (relative paths start at {Path.cwd()})")
    elif src.is_file() and src.suffix == ".gguf" and importlib.util.find_spec("gguf") is None:
        problems.append(f"model.source: loading {src.name} needs the `gguf` package: pip install 'linearize[gguf]'")
    from linearize.io.loading import linearize_section

    sections = [("finetune.data", recipe.finetune.data)]
    if linearize_section(recipe.model.source, allow_hub=False) is None:  # stage 1 runs: its data must exist
        sections.insert(0, ("convert.data", recipe.convert.data))
    for key, value in sections:
        for one in data_sources(value):  # a source or a mixture
            if one and looks_like_path(str(one)) and not Path(str(one)).expanduser().exists():
                problems.append(f"{key}: {one} does not exist (relative paths start at {Path.cwd()})")
            elif one:
                try:
                    check_data_source(one)  # readable files, pyarrow for parquet, datasets for a dataset name
                except LinearizeError as e:
                    problems.append(f"{key}: {e}")
    if recipe.eval.text and not Path(recipe.eval.text).expanduser().is_file():
        problems.append(f"eval.text: {recipe.eval.text} is not a file (relative paths start at {Path.cwd()})")
    elif recipe.eval.text:
        from linearize.eval.config import text_file_problems

        problems.extend(text_file_problems(recipe.eval.text, key="eval.text"))
    problem = output_path_problem(Path(recipe.output))
    if problem:
        problems.append(f"output: {problem}")
    else:  # the exports inside it follow the rules of every export folder (overwrite is checked by the run itself)
        exports = [recipe.finetuned_dir]
        if "convert.data" in dict(sections):
            exports.insert(0, recipe.converted_dir)
        for folder in exports:
            try:
                check_export_folder(folder, overwrite=True, sources=(recipe.model.source,), flag="output")
            except LinearizeError as e:
                problems.append(str(e))
    if problems:
        raise ConfigError("recipe paths: " + "; ".join(problems))


if __name__ == "__main__":  # regenerate the reference section of docs/recipes.md
    print(reference_markdown())
