"""The one typed config of the eval stage (``linearize eval``): what to evaluate, on what, and where results go.

Plain field types only (str, int, float, bool, Literal, lists of them, None-able), each with one default and a
one-line docstring, so CLI flags and their help can be generated from the fields. Pydantic checks the types;
:meth:`EvalConfig.check` checks the values together and raises one :class:`~linearize.errors.ConfigError` naming
every problem by field (run by :func:`linearize.eval.run_eval` before anything loads).

    from linearize.eval import EvalConfig, run_eval
    cfg = EvalConfig(model="out/smollm2-linear", compare="HuggingFaceTB/SmolLM2-135M",
                     text="shared/data/wikitext-raw/wiki.valid.raw",
                     mc_files=["shared/data/llm-foundry-icl/piqa.jsonl"], json_out="eval.json", plot="plots")
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from linearize.errors import ConfigError
from linearize.settings import Settings

__all__ = ["BASELINES", "MQAR_KEYS", "TASKS", "EvalConfig", "text_file_problems"]

Task = Literal["ppl", "distance", "mc", "passkey", "mqar"]
TASKS: tuple[str, ...] = ("ppl", "distance", "mc", "passkey", "mqar")
Baseline = Literal["linear-off", "streaming"]
BASELINES: tuple[str, ...] = ("linear-off", "streaming")

#: the keys of :func:`~linearize.eval.recall.mqar` prompts: short, common, distinct nouns (at most this many pairs
#: per prompt); here, so that checking ``mqar_pairs`` loads no model code
MQAR_KEYS = (
    "apple bird boat book bread chair cloud coat cup desk door dress drum egg farm flag flower fork frog garden "
    "gate girl glass goat hat hill horse house key kite lamp leaf lion milk moon mouse nest night pen pig plate "
    "queen rain ring river road rock rose school sea sheep ship shoe sky snow sock spoon star stone sun table "
    "tent toy train tree truck wall water window wolf"
).split()


class EvalConfig(Settings):
    """Settings of one ``linearize eval`` run (model and, optionally, its teacher side by side)."""

    model: str | None = None
    """Model to evaluate: a linearized export folder, any HF causal-LM folder, a .gguf file or a hub id."""
    compare: str | None = None
    """Teacher to evaluate side by side (same forms as model); None evaluates the model alone."""
    tasks: list[Task] | None = None
    """Evaluations: ppl, distance (both need text), mc (needs mc_files), passkey, mqar; unset = all with inputs."""
    text: str | None = None
    """Raw UTF-8 text file for perplexity (e.g. WikiText-103 wiki.valid.raw)."""
    context: int = 1024
    """Perplexity window length in tokens (at most the model's max_position_embeddings)."""
    stride: int = 512
    """Tokens each perplexity window advances; equal to context for non-overlapping blocks."""
    max_tokens: int | None = None
    """Score only the first max_tokens tokens of text (None: the whole file)."""
    distance_context: int = 4096
    """Window of the perplexity-by-distance pass (non-overlapping; capped at the model's max_position_embeddings)."""
    distance_tokens: int = 65536
    """Tokens of text (its first) scored by their position within the distance_context windows."""
    mc_files: list[str] = []
    """jsonl task files (llm-foundry multiple_choice, schema or language_modeling layout)."""
    mc_delimiter: str = " "
    """Put between context and continuation when neither side has whitespace at the join."""
    limit: int | None = None
    """Score only the first limit items of each mc file (None: all)."""
    passkey_contexts: list[int] = [1024, 2048, 4096, 8192, 16384]
    """Passkey prompt lengths in tokens; those past the model's max_position_embeddings are skipped."""
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    """Where the pass key sits in the filler: 0 = start, 1 = just before the question."""
    passkey_samples: int = 4
    """Prompts (random keys) per context and depth."""
    mqar_pairs: list[int] = [4, 8, 16, 32, 64]
    """Key-value pair counts N for multi-query associative recall."""
    mqar_samples: int = 8
    """MQAR prompts per N."""
    baselines: list[Baseline] = ["linear-off", "streaming"]
    """Extra rows, each a pass of all tasks: linear-off (model, linear part off), streaming (compare at its window)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype; auto = bfloat16 on a GPU, float32 on the CPU."""
    device: str = "auto"
    """Where to run: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    json_out: str | None = None
    """Write the full result as JSON to this file."""
    plot: str | None = None
    """Write PNG plots (passkey vs context, MQAR vs N) into this folder (needs matplotlib)."""
    overwrite: bool = False
    """Replace json_out and the plots when an earlier linearize run wrote them (never a file linearize did not write)."""
    seed: int = 0
    """Seed of the passkey keys and the MQAR pairs."""

    @field_validator("baselines", mode="before")
    @classmethod
    def _none_is_empty(cls, v):
        """``none`` (``--baselines none``) is the empty list."""
        if v is None or (isinstance(v, str) and v.lower() == "none"):
            return []
        if isinstance(v, list) and [str(x).lower() for x in v] == ["none"]:
            return []
        return v

    @property
    def selected_tasks(self) -> list[str]:
        """``tasks``, or when none were given, every task whose input is given."""
        if self.tasks is not None:
            return list(self.tasks)
        return [t for t in TASKS if (t not in ("ppl", "distance") or self.text) and (t != "mc" or self.mc_files)]

    def problems(self) -> list[str]:
        """Every inconsistent or out-of-range value, each naming its field and the fix; input files are checked
        here too (they exist; the text file is UTF-8 text), before any model loads."""
        out = []
        tasks = self.selected_tasks
        if not self.model:
            out.append("model is not set; pass a linearized export folder, a model folder, a .gguf file or a hub id")
        if not tasks:
            out.append(f"tasks is empty; pick from {', '.join(TASKS)}")
        for task in ("ppl", "distance"):
            if task in tasks and not self.text:
                out.append(f"tasks includes {task} but text is not set; pass a raw text file or drop {task} from "
                           "tasks")
        if "mc" in tasks and not self.mc_files:
            out.append("tasks includes mc but mc_files is empty; pass jsonl task files or drop mc from tasks")
        if self.text and ("ppl" in tasks or "distance" in tasks):
            out.extend(text_file_problems(self.text))
        out.extend(f"mc_files: {f} is not a file" for f in self.mc_files if not Path(f).expanduser().is_file())
        if "mc" in tasks:
            out.extend(_task_file_problems([f for f in self.mc_files if Path(f).expanduser().is_file()], self.limit))
        for name in ("context", "distance_context", "distance_tokens"):
            if getattr(self, name) < 2:
                out.append(f"{name}={getattr(self, name)} must be >= 2")
        if not 1 <= self.stride <= max(self.context, 1):
            out.append(f"stride={self.stride} must be between 1 and context={self.context}")
        for name in ("max_tokens", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name}={value} must be >= 1 (or unset for all)")
        for name in ("passkey_samples", "mqar_samples", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)} must be >= 1")
        bad = [d for d in self.passkey_depths if not 0.0 <= d <= 1.0]
        if bad:
            out.append(f"passkey_depths {bad} must be between 0 and 1")
        bad = [c for c in self.passkey_contexts if c < 1]
        if bad:
            out.append(f"passkey_contexts {bad} must be positive token counts")
        bad = [n for n in self.mqar_pairs if not 1 <= n <= len(MQAR_KEYS)]
        if bad:
            out.append(f"mqar_pairs {bad} must be between 1 and {len(MQAR_KEYS)} (the number of distinct keys)")
        if self.compare and self.compare == self.model:
            out.append("compare is the same as model; pass the teacher the model was converted from")
        out.extend(self.output_problems())
        return out

    def output_problems(self) -> list[str]:
        """What stops ``json_out`` or the plots from being written, found before anything loads: a folder where a
        file goes, a file linearize did not write (or wrote, without ``overwrite``;
        :func:`linearize.export.writer.check_output_file`), a folder that cannot be written, matplotlib missing."""
        from linearize.errors import LinearizeError
        from linearize.export.writer import check_output_file

        out = []
        files = [(self.json_out, "--json-out")] if self.json_out is not None else []
        if self.plot is not None:
            from linearize.eval.plots import PLOTTED_TASKS, require_matplotlib

            folder = Path(self.plot).expanduser()
            if folder.exists() and not folder.is_dir():
                out.append(f"--plot {folder} is a file; name a folder for the PNGs")
            else:
                files += [(folder / f"{task}.png", "--plot") for task in PLOTTED_TASKS if task in self.selected_tasks]
            try:
                require_matplotlib("--plot")
            except LinearizeError as e:
                out.append(str(e))
        for path, flag in files:
            try:
                check_output_file(path, overwrite=self.overwrite, flag=flag)
            except LinearizeError as e:
                out.append(str(e))
        return out

    def check(self) -> None:
        """Raise one :class:`ConfigError` listing every problem (none: return).

        Raises:
            ConfigError: see :meth:`problems`.
        """
        found = self.problems()
        if found:
            raise ConfigError("invalid eval settings: " + "; ".join(found))


def _task_file_problems(files: list[str], limit: int | None) -> list[str]:
    """Each task file read and checked as the mc task will read it (the first ``limit`` records), before any model
    loads."""
    from linearize.errors import DataError
    from linearize.eval.multiple_choice import load_task

    out = []
    for path in files:
        try:
            load_task(path, limit=limit if limit is None or limit > 0 else None)
        except DataError as e:
            out.append(f"mc_files: {e}")
    return out


def text_file_problems(path: str | Path, key: str = "text") -> list[str]:
    """Why ``path`` cannot be read as UTF-8 text (missing, unreadable, binary or another encoding), by ``key``; []
    when it can. Checked before any model loads (``linearize eval``'s text, a recipe's ``eval.text``)."""
    path = Path(path).expanduser()
    if not path.is_file():
        return [f"{key}: {path} is not a file"]
    try:
        raw = path.read_bytes()
    except OSError as e:
        return [f"{key}: cannot read {path} ({e.strerror or e})"]
    try:
        if b"\0" in raw[:65536]:
            raise UnicodeDecodeError("utf-8", raw[:1], 0, 1, "NUL byte")
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return [f"{key}: {path} is not UTF-8 text (binary file?); pass a raw text file such as wiki.valid.raw"]
    return []
