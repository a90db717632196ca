"""The model card (``README.md``) of an export, generated from the files in the export folder.

Everything in it comes from the folder: the settings from ``config.json`` (``linearize``), the numbers from
``transfer_report.json`` and ``finetune_report.json`` (each said on which text it was measured: text the teacher
sampled itself, or held-out real text), the cache from ``config.json`` (:func:`linearize.export.describe.describe`), the
install line from this package's version and requirements. ``huggingface_hub.ModelCard.load`` parses it: YAML front
matter with ``base_model`` (the teacher's hub id, when it came from the hub), ``library_name: transformers``,
``pipeline_tag: text-generation`` and tags. It names no local path (``linearize.io.portable``)::

    from linearize.export.card import write_card
    write_card(Path("runs/x"))          # (re)writes runs/x/README.md from the files there
"""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import Any

from linearize.io.portable import LOCAL, is_local_reference, portable_reference

CARD_NAME = "README.md"
TAGS = ("linearize", "linear-attention")
_TRANSFORMERS_RANGE = ">=5.17,<6"  # pyproject's, for a copy of the package without an install record


def write_card(folder: str | Path, *, name: str | None = None) -> Path:
    """Write ``folder/README.md`` (the export's card) and return its path. ``name`` is how the card calls the model
    and the folder in its loading example (default: the folder's name)."""
    folder = Path(folder)
    path = folder / CARD_NAME
    path.write_text(model_card(folder, name=name))
    return path


def model_card(folder: str | Path, *, name: str | None = None) -> str:
    """The text of the card of the export in ``folder`` (see the module docstring)."""
    folder = Path(folder)
    name = name or folder.absolute().name
    cfg = _read_json(folder / "config.json") or {}
    lin = cfg.get("linearize") or {}
    transfer = _read_json(folder / "transfer_report.json")
    finetune = _read_json(folder / "finetune_report.json")
    teacher = portable_reference(lin.get("teacher"))
    parts = [_front_matter(lin, teacher, finetune), f"# {name}",
             _summary(folder, name, cfg, lin, teacher, transfer, finetune), _settings(lin, transfer, finetune),
             _measurements(transfer, finetune), _usage(folder, name, lin)]
    return "\n\n".join(p for p in parts if p) + "\n"


# -- pieces ------------------------------------------------------------------------------------------------------
def _front_matter(lin: dict, teacher: str | None, finetune: dict | None) -> str:
    from huggingface_hub import ModelCardData

    tags = [*TAGS, lin.get("feature_map"), lin.get("base_model_type")]
    if lin.get("window"):
        tags.append("sliding-window-attention")
    if finetune is not None:
        tags.append("lora")
    data = ModelCardData(base_model=teacher if _is_hub_id(teacher) else None, library_name="transformers",
                         pipeline_tag="text-generation", tags=[t for t in tags if t])
    return f"---\n{data.to_yaml()}\n---"


def _summary(folder: Path, name: str, cfg: dict, lin: dict, teacher: str | None, transfer: dict | None,
             finetune: dict | None) -> str:
    from linearize import __version__

    n_layers = _n_layers(cfg)
    softmax = lin.get("softmax_layers") or []
    layers = f"{n_layers - len(softmax)} of its {n_layers} layers" if n_layers is not None else "its layers"
    window = ""
    if lin.get("window"):
        sinks = f" and the first {lin['sinks']}" if lin.get("sinks") else ""
        window = f", plus exact softmax over the last {lin['window']} tokens{sinks}"
    kept = f"; layers {softmax} keep the teacher's softmax attention" if softmax else ""
    what = (f"`{name}` is {_model_name(teacher)} ({lin.get('base_model_type') or cfg.get('model_type')}) with its "
            f"softmax attention replaced by linear attention by linearize {__version__}: {layers} use linear "
            f"attention with `{lin.get('feature_map')}` feature maps{window}{kept}.")
    lines = [what]
    if transfer is not None:
        steps, tokens = transfer.get("steps", 0), transfer.get("tokens", 0)
        lines.append(f"Attention transfer trained the feature maps and mix factors, every original weight frozen, on "
                     f"{tokens:,} tokens ({steps} steps)." if steps else
                     "Its feature maps are untrained: attention transfer ran 0 steps.")
    if finetune is not None:
        lora = (finetune.get("recipe") or {}).get("finetune", {}).get("lora", {})
        how = "merged into the weights" if finetune.get("merged", True) else "kept apart in `adapter/`"
        lines.append(f"Then LoRA (rank {lora.get('rank')}) on {', '.join(finetune.get('lora_targets') or [])} was "
                     f"finetuned on {finetune.get('tokens', 0):,} tokens ({finetune.get('steps', 0)} steps), "
                     f"{how}.")
    cache = _cache(folder)
    if cache:
        lines.append(cache)
    return " ".join(lines)


def _settings(lin: dict, transfer: dict | None, finetune: dict | None) -> str:
    rows = [("feature map", f"`{lin.get('feature_map')}`" + (f", projected to {lin['proj_dim']}"
                                                             if lin.get("proj_dim") else "")),
            ("window", f"{lin.get('window')} tokens" + (" (pure linear attention)" if not lin.get("window") else "")),
            ("sinks", lin.get("sinks")),
            ("softmax layers", lin.get("softmax_layers") or "none"),
            *([("window-only layers (linear part off)", lin["window_only_layers"])]
              if lin.get("window_only_layers") else []),
            ("recurrent state per", f"{lin.get('state_per')} head"),
            ("mix factor init", lin.get("mix_init"))]
    if transfer is not None:
        s, calib = transfer.get("settings") or {}, transfer.get("calibration") or {}
        rows += [("transfer tokens", f"{transfer.get('tokens', 0):,} ({transfer.get('steps', 0)} steps)"),
                 ("transfer seq len", calib.get("seq_len", s.get("seq_len"))),
                 ("transfer batch / lr / loss", f"{s.get('batch_size')} / {s.get('lr')} / {s.get('loss')}"),
                 ("calibration text", _text_kind(s.get("data"), calib.get("source")))]
        selection = transfer.get("selection")
        if selection:
            rows.append(("softmax layers chosen by", f"{s.get('selection_score')} score "
                         f"(auto_softmax_layers {s.get('auto_softmax_layers')}, state_budget {s.get('state_budget')})"))
        if transfer.get("window_only"):
            rows.append(("window-only layers chosen by", f"{s.get('selection_score')} score on held-out text "
                         f"(auto_window_only), {transfer['window_only']['base']:.4g} -> "
                         f"{transfer['window_only']['score']:.4g}"))
    if finetune is not None:
        f = (finetune.get("recipe") or {}).get("finetune", {})
        lora, kd, data = f.get("lora") or {}, f.get("kd"), finetune.get("data") or {}
        rows += [("LoRA rank / alpha / dropout", f"{lora.get('rank')} / {lora.get('alpha')} / {lora.get('dropout')}"),
                 ("LoRA targets", ", ".join(finetune.get("lora_targets") or [])),
                 ("feature maps trained in finetuning", f.get("train_feature_maps")),
                 ("finetune tokens", f"{finetune.get('tokens', 0):,} ({finetune.get('steps', 0)} steps)"),
                 ("finetune seq len", data.get("seq_len", f.get("seq_len"))),
                 ("finetune batch / lr", f"{f.get('batch_size')} / {f.get('lr')}"),
                 ("distillation", f"weight {kd.get('weight')}, temperature {kd.get('temperature')}" if kd else "none"),
                 ("finetuning text", _text_kind(f.get("data"), data.get("source")))]
    sources = ["`config.json` (`linearize`)"] + [f"`{name}`" for name, report in (
        ("transfer_report.json", transfer), ("finetune_report.json", finetune)) if report is not None]
    table = "\n".join(f"| {k} | {_cell(v)} |" for k, v in rows)
    return (f"## Conversion settings\n\nFrom {', '.join(sources[:-1])}{' and ' if len(sources) > 1 else ''}"
            f"{sources[-1]}.\n\n| setting | value |\n| --- | --- |\n{table}")


def _measurements(transfer: dict | None, finetune: dict | None) -> str:
    out = []
    if transfer is not None and transfer.get("trained"):
        s, calib = transfer.get("settings") or {}, transfer.get("calibration") or {}
        rows = [("before transfer (untrained feature maps)", transfer.get("untrained"))]
        trained_all = (transfer.get("selection") or {}).get("trained_all_linear")
        if trained_all:
            rows.append(("after transfer, every layer linear", trained_all))
        rows.append(("after transfer (this export)" if finetune is None else "after transfer", transfer["trained"]))
        if transfer.get("linear_off"):
            rows.append(("after transfer, its linear part off (sinks + window only)", transfer["linear_off"]))
        keys = ("kl", "ppl_teacher", "ppl_student", "ppl_ratio")
        table = "\n".join(f"| {label} | " + " | ".join(_num(m.get(k)) for k in keys) + " |" for label, m in rows if m)
        out.append(
            "### Attention transfer (`transfer_report.json`)\n\n"
            f"Measured on {calib.get('valid_sequences')} held-out sequences of {calib.get('seq_len')} tokens "
            f"({_count(transfer['trained'].get('tokens'))} tokens scored) of the calibration text: "
            f"{_text_kind(s.get('data'), calib.get('source'))}. KL is the next-token KL divergence from the teacher "
            "(nats per token); the ratio is the model's perplexity over the teacher's on the same text.\n\n"
            "| model | KL to teacher | teacher perplexity | model perplexity | perplexity ratio |\n"
            "| --- | --- | --- | --- | --- |\n" + table)
    if finetune is not None and finetune.get("after"):
        f, data = (finetune.get("recipe") or {}).get("finetune", {}), finetune.get("data") or {}
        sides = (("teacher (softmax attention)", finetune.get("teacher_metrics") or {}),
                 ("after transfer, before finetuning", finetune.get("before") or {}),
                 ("after finetuning (this export" + ("" if finetune.get("merged", True) else " with its adapter")
                  + ")", finetune["after"]))
        valid_text = (f"{data.get('valid_sequences')} held-out sequences of {data.get('seq_len')} tokens of the "
                      f"finetuning text: {_text_kind(f.get('data'), data.get('source'))}")
        out.append("### LoRA finetuning (`finetune_report.json`)\n\n" + _loss_table("valid", sides, valid_text))
        if "text" in finetune["after"]:
            ev = (finetune.get("recipe") or {}).get("eval") or {}
            text = (f"the text file `{_file_name(ev.get('text'))}` (blocks of {ev.get('seq_len')} tokens"
                    + (f", first {ev['max_tokens']:,} tokens" if ev.get("max_tokens") else "") + ")")
            out.append(_loss_table("text", sides, text))
    if not out:
        return ""
    return "## Measured\n\nBy the run that wrote this export (its reports are in this folder).\n\n" + "\n\n".join(out)


def _loss_table(key: str, sides, text: str) -> str:
    teacher_ppl = (sides[0][1].get(key) or {}).get("ppl")
    rows = []
    for label, metrics in sides:
        m = metrics.get(key)
        if m:
            ratio = m["ppl"] / teacher_ppl if teacher_ppl else None
            rows.append(f"| {label} | {_num(m.get('loss'))} | {_num(m.get('ppl'))} | {_num(ratio)} |")
    tokens = next((_count(m[key].get("tokens")) for _, m in sides if m.get(key)), "?")
    return (f"Next-token loss (nats per token) and perplexity on {text}; {tokens} tokens scored.\n\n"
            "| model | loss | perplexity | perplexity / teacher's |\n| --- | --- | --- | --- |\n" + "\n".join(rows))


def _usage(folder: Path, name: str, lin: dict) -> str:
    from linearize import __version__
    from linearize.models.delta import DELTA_FILE

    tok = (folder / "tokenizer_config.json").is_file()
    lines = ["## Use", "", f"Needs `pip install linearize=={__version__}` ({_requirements()}); `trust_remote_code` "
             "loading runs the `modeling_linearize.py` in this folder, which imports the model classes from that "
             "package, so it needs the package too.", "", "```python",
             "import linearize  # registers the linearized architectures with transformers' Auto classes",
             "from transformers import AutoModelForCausalLM" + (", AutoTokenizer" if tok else ""), "",
             f'path = "{name}"  # this folder, or the hub id it was uploaded to',
             "model = AutoModelForCausalLM.from_pretrained(path)"]
    if tok:
        lines.append("tokenizer = AutoTokenizer.from_pretrained(path)")
    lines += ["```", "", "or without importing linearize:", "", "```python",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)", "```"]
    if (folder / "adapter" / "adapter_config.json").is_file():
        lines += ["", "The LoRA adapter is not merged: `adapter/` holds it, and the weights here are its base (with "
                  "the feature maps it was trained with). Load both with", "", "```python",
                  "from peft import PeftModel", "",
                  'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), path, '
                  'subfolder="adapter")', "```", "",
                  "Its `adapter_config.json` names its base as `.`, so `AutoPeftModelForCausalLM.from_pretrained("
                  "\"adapter\")` works when run inside this folder."]
    if (folder / DELTA_FILE).is_file():
        base = lin.get("delta_base")
        lines += ["", f"This is a delta export: `{DELTA_FILE}` holds only the parameters linearization added, and "
                  "`from_pretrained` loads them onto the base model named by `config.json`'s `linearize.delta_base`"
                  + (f", `{base}`, which must still be the weights the conversion started from."
                     if _is_hub_id(base) else
                     f": a local model ({portable_reference(base).removeprefix(LOCAL)}), recorded by its absolute "
                     "path on the machine that converted it, so this folder loads only where that path exists. To "
                     "share it, convert with `--export full`.")]
    return "\n".join(lines)


# -- helpers -----------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _is_hub_id(ref: str | None) -> bool:
    from linearize.io.sources import looks_like_path

    return bool(ref) and not is_local_reference(ref) and not Path(ref).is_absolute() and not looks_like_path(ref)


def _model_name(teacher: str | None) -> str:
    if not teacher:
        return "a model"
    if is_local_reference(teacher):
        return f"the local model `{teacher.removeprefix(LOCAL)}`"
    if _is_hub_id(teacher):
        return f"[`{teacher}`](https://huggingface.co/{teacher})"
    return f"`{teacher}`"


def _text_kind(data: Any, source: str | None) -> str:
    """What a measurement's text was: the teacher's own samples (no data setting), or real text."""
    kind = "text the teacher sampled itself, not real text" if data is None else "real text"
    return f"{kind} ({source})" if source else kind


def _file_name(ref: Any) -> str:
    ref = portable_reference(ref) or "?"
    return ref.removeprefix(LOCAL) if is_local_reference(ref) else Path(ref).name


def _n_layers(cfg: dict) -> int | None:
    for key in ("num_hidden_layers", "n_layer"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def _cache(folder: Path) -> str:
    """One sentence on the generation cache, from :func:`linearize.export.describe.describe` (config.json alone)."""
    from linearize.export.describe import INFO_CONTEXT, describe

    try:
        d = describe(folder)
    except Exception:  # noqa: BLE001 - a card without the cache sentence is still a card
        return ""
    return (f"Its generation cache per sequence: {d['cache per sequence']}; at {INFO_CONTEXT:,} tokens, "
            f"{d[f'cache at {INFO_CONTEXT:,} tokens']}.")


def _requirements() -> str:
    """The transformers and torch versions this package requires, from its install record."""
    wanted = {"transformers": f"transformers{_TRANSFORMERS_RANGE}"}
    try:
        from packaging.requirements import Requirement

        for line in metadata.requires("linearize") or []:
            req = Requirement(line)
            if req.marker is None and req.name in ("transformers", "torch"):
                specs = sorted(req.specifier, key=lambda s: (not s.operator.startswith(">"), s.version))
                wanted[req.name] = req.name + ",".join(str(s) for s in specs)
    except (metadata.PackageNotFoundError, ImportError):
        pass
    return ", ".join(wanted[k] for k in ("transformers", "torch") if k in wanted)


def _num(x: Any) -> str:
    return "–" if x is None else f"{x:.4g}"


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def _cell(v: Any) -> str:
    return str(v).replace("|", "\\|")


__all__ = ["CARD_NAME", "TAGS", "model_card", "write_card"]
