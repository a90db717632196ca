"""7-8B shapes through both stages in one process, without the disk (#14): a random-weight model with a real
architecture's shapes (benchmarks/random_model.py SHAPES), attention transfer at seq_len 2048 (batch 8, the default
hybrid Hedgehog W=64 + 4 sinks), then LoRA r=8 on q/k/v/o with KD 0.5 from the shared teacher (batch 8 = 4 x 2),
through the pipelines' own functions (run_transfer, apply_lora, finetune.train). Tokens/s excludes the first
WARM steps (kernel compilation); peak memory is the whole stage's. Also the delta export's size.
With EXPORT_DIR set (a fast filesystem with ~2.2x the bf16 weights free, e.g. /dev/shm), also the time to save the
base model, to write the stage-1 delta export and the merged full export (``save_linearized``), and to load each back
with ``AutoModelForCausalLM.from_pretrained`` onto the GPU, each reload checked against the in-memory model's logits.
TOKENIZER (a tokenizer folder, default ../shared/data/stories260K-hf) is saved with the base, as real bases have one.
PROJ_DIM=64 sets Hedgehog's projection per half (default head_dim: 128 -> F = 256 features per head; LoLCATs' 64).
With PROFILE=DIR, steps WARM + 1 and WARM + 2 of each stage also run under torch.profiler, and DIR/SHAPE-transfer.txt
and DIR/SHAPE-lora.txt get the 40 operators and kernels with the most device time (their rates then include the
profiler's overhead: profile in a run of its own).
The GPU machine's disk wrote ~20 MB/s on 2026-12-01 (16 GB of weights: 13 min), which is why this script exists
next to benchmarks/gpu_7b_shapes.sh (the same stages through the CLI, with export and reload).
    python benchmarks/gpu_7b_inprocess.py llama-3-8b OUT.json [STEPS1 STEPS2 SEQ]"""
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from linearize.bench.shapes import SHAPES
from linearize.convert.config import TransferConfig
from linearize.convert.surgery import linearize_model
from linearize.convert.transfer import attention_modules, run_transfer
from linearize.models import classes_for
from linearize.models.delta import write_delta
from linearize.modules.attention import LinearAttentionConfig

WARM = 2


def timed_hook(stamps, profile_to: Path | None = None):
    """Stamps every step; with ``profile_to``, profiles the two steps after the first WARM."""
    prof = None
    if profile_to is not None:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        prof = profile(activities=acts)

    def hook(step, total, loss, tps):
        stamps.append((step, time.perf_counter()))
        if prof is None:
            return
        if len(stamps) == WARM:
            prof.start()
        elif len(stamps) == WARM + 2:
            prof.stop()
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            profile_to.parent.mkdir(parents=True, exist_ok=True)
            profile_to.write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    return hook


def rate(stamps, tokens_per_step):
    (s0, t0), (s1, t1) = stamps[WARM - 1], stamps[-1]
    return (s1 - s0) * tokens_per_step / (t1 - t0)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def _reload(path: Path, ids, reference, device, dt) -> dict:
    """from_pretrained(path) onto ``device``: seconds and the largest logit difference to ``reference``."""
    from transformers import AutoModelForCausalLM

    import linearize  # noqa: F401  (registers the Linearized* classes)

    model, seconds = _timed(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dt, device_map=device))
    with torch.no_grad():
        diff = (model(ids).logits.float() - reference).abs().max().item()
    del model
    return {"reload_s": seconds, "max_logit_diff": diff}


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    import argparse

    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, LlamaConfig

    from linearize.finetune import teacher as teachers
    from linearize.finetune.config import DistillConfig, FinetuneConfig, LoRAConfig
    from linearize.finetune.lora import apply_lora
    from linearize.finetune.train import train

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path, metavar="OUT.json")
    ap.add_argument("steps1", type=int, nargs="?", default=12, help="transfer steps (default 12)")
    ap.add_argument("steps2", type=int, nargs="?", default=8, help="LoRA steps (default 8)")
    ap.add_argument("seq", type=int, nargs="?", default=2048, help="sequence length (default 2048)")
    a = ap.parse_args()
    shape, out, steps1, steps2, seq = a.shape, a.out, a.steps1, a.steps2, a.seq
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dt).eval()
    res = {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "seq_len": seq}
    adapter = classes_for(model.config.model_type)[1].adapter
    teacher = attention_modules(model, adapter)
    proj = os.environ.get("PROJ_DIM")  # Hedgehog's projection per half (default head_dim; LoLCATs: 64 for 128-dim heads)
    attention = LinearAttentionConfig(window=64, sinks=4, proj_dim=int(proj) if proj else None)
    students = {i: adapter.build(m, attention, i) for i, m in teacher.items()}
    for s in students.values():
        s.linear_attn.to(device)
    ids = torch.randint(0, cfg.vocab_size, (8 * max(steps1, steps2) + 8, seq))
    probe = torch.randint(0, cfg.vocab_size, (1, 64), device=device)
    export_dir = Path(os.environ["EXPORT_DIR"]) / shape if os.environ.get("EXPORT_DIR") else None
    if export_dir is not None:
        shutil.rmtree(export_dir, ignore_errors=True)
        from transformers import AutoTokenizer

        _, seconds = _timed(lambda: model.save_pretrained(export_dir / "base"))
        default_tok = Path(__file__).resolve().parents[2] / "shared/data/stories260K-hf"
        AutoTokenizer.from_pretrained(os.environ.get("TOKENIZER", default_tok)).save_pretrained(export_dir / "base")
        res["export"] = {"dir": str(export_dir), "base_save_s": seconds, "base_bytes": _dir_bytes(export_dir / "base")}
        print(json.dumps(res["export"]), flush=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stamps = []
    prof_dir = Path(os.environ["PROFILE"]) if os.environ.get("PROFILE") else None
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r = run_transfer(model, adapter, teacher, students, ids[: 8 * steps1], ids[-8:], TransferConfig(batch_size=8),
                         work_dir=Path(tmp), max_steps=steps1,
                         on_step=timed_hook(stamps, prof_dir and prof_dir / f"{shape}-transfer.txt"))
    res["transfer"] = {"steps": r.steps, "tokens": r.tokens, "loop_s": r.seconds, "wall_s": time.perf_counter() - t0,
                       "tokens_per_s": rate(stamps, 8 * seq),
                       "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    print(json.dumps(res["transfer"]), flush=True)
    model = linearize_model(model, attention, teacher="random-weights", prebuilt=students)
    with tempfile.TemporaryDirectory() as tmp:
        res["delta_bytes"] = write_delta(model, Path(tmp), "random-weights")
    if export_dir is not None:  # stage 1 changed no base weight: a delta export on the saved base is valid here
        from linearize.export.writer import save_linearized

        with torch.no_grad():
            reference = model(probe).logits.float()
        _, seconds = _timed(lambda: save_linearized(model, export_dir / "delta", delta_base=str(export_dir / "base")))
        res["export"]["delta"] = {"write_s": seconds, "bytes": _dir_bytes(export_dir / "delta"),
                                  **_reload(export_dir / "delta", probe, reference, device, dt)}
        print(json.dumps(res["export"]["delta"]), flush=True)
        del reference
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    lora = LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = apply_lora(model, lora, train_feature_maps=False, seed=0)
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if device == "cuda" else "no")
    wrapped = accelerator.prepare(peft_model)
    f = FinetuneConfig(lora=lora, tokens=8 * seq * steps2, seq_len=seq, batch_size=8, micro_batch_size=2,
                       kd=DistillConfig(weight=0.5), checkpoint_every=0)
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        r2 = train(wrapped, ids[: 8 * steps2], f, seed=0, accelerator=accelerator, work_dir=Path(tmp),
                   teacher=teachers.shared(wrapped, peft_model),
                   on_step=timed_hook(stamps, prof_dir and prof_dir / f"{shape}-lora.txt"))
    res["lora_kd"] = {"steps": r2.steps, "tokens": r2.tokens, "loop_s": r2.seconds, "wall_s": time.perf_counter() - t0,
                      "tokens_per_s": rate(stamps, 8 * seq),
                      "peak_GiB": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    if export_dir is not None:
        from linearize.export.writer import save_linearized

        merged = accelerator.unwrap_model(wrapped).merge_and_unload()
        for p in merged.parameters():  # as the pipeline exports: feature maps back to the checkpoint's dtype
            if p.is_floating_point() and p.dtype != dt:
                p.data = p.data.to(dt)
        with torch.no_grad():
            reference = merged(probe).logits.float()
        _, seconds = _timed(lambda: save_linearized(merged, export_dir / "full"))
        res["export"]["full"] = {"write_s": seconds, "bytes": _dir_bytes(export_dir / "full"),
                                 **_reload(export_dir / "full", probe, reference, device, dt)}
        shutil.rmtree(export_dir, ignore_errors=True)
    print(json.dumps(res, indent=1), flush=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
