"""Peak memory and time of one finetuning micro-batch with full-vocabulary logits (``finetune.loss_chunk`` 0) and
with the chunked loss (1024 rows), at Llama-3's vocabulary (#14): a 2-layer random-weight Llama with Llama-3-8B's
hidden size, heads and vocabulary (the head dominates: the worst case for the chunked loss's recomputation),
linearized (W=64, 4 sinks), LoRA r=8 on q/k/v/o, bf16 autocast, micro-batch 2 x 2048; with and without KD 0.5 from
the shared teacher; and the validation loss over 4 x 2048 a batch.
    python benchmarks/gpu_chunked_loss.py [OUT.json]
(The 2026-12-01 numbers in docs/finetune.md came from a one-off script of the same setup; this is its reproducible
form, written afterwards.)"""
import json
import time

import torch

from linearize.convert.surgery import linearize_model
from linearize.finetune import teacher as teachers
from linearize.finetune.config import DistillConfig, LoRAConfig
from linearize.finetune.lora import apply_lora
from linearize.finetune.loss import causal_lm
from linearize.finetune.train import micro_batch_loss, validation_loss
from linearize.modules.attention import LinearAttentionConfig


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", metavar="OUT.json", help="write the rows here too")
    out = ap.parse_args().out
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, LlamaConfig

    gpu = torch.cuda.is_available()  # without one: a tiny CPU dry run of the same code
    dims = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8) if gpu else dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                       num_attention_heads=4, num_key_value_heads=2)
    cfg = LlamaConfig(**dims, num_hidden_layers=2, max_position_embeddings=8192)
    device, T = ("cuda", 2048) if gpu else ("cpu", 128)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if gpu else torch.float32)
    model = linearize_model(model, LinearAttentionConfig(window=64, sinks=4)).to(device)
    lora = LoRAConfig(rank=8, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = apply_lora(model, lora, train_feature_maps=False, seed=0)
    accelerator = Accelerator(cpu=not gpu, mixed_precision="bf16" if gpu else "no")
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated() / 2**30) if gpu else (lambda: None)
    reset = (lambda: (torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats())) if gpu else (lambda: None)
    wrapped = accelerator.prepare(peft_model)
    lm = causal_lm(accelerator.unwrap_model(wrapped))
    teacher = teachers.shared(wrapped, peft_model)
    ids = torch.randint(0, cfg.vocab_size, (2, T), device=device)
    rows = []
    for kd in (None, DistillConfig(weight=0.5)):
        for chunk in (0, 1024):
            def one():
                loss = micro_batch_loss(wrapped, ids, lm=lm, loss_chunk=chunk, kd=kd, teacher=teacher,
                                        autocast=accelerator.autocast)
                accelerator.backward(loss)
                wrapped.zero_grad(set_to_none=True)
                return loss
            one()  # warm-up (kernel compilation)
            sync()
            reset()
            t0 = time.perf_counter()
            for _ in range(5):
                loss = one()
            sync()
            rows.append({"what": "train micro-batch", "kd": kd is not None, "loss_chunk": chunk,
                         "ms": (time.perf_counter() - t0) / 5 * 1e3, "loss": float(loss.detach()),
                         "peak_GiB": peak()})
            print(json.dumps(rows[-1]), flush=True)
    blocks = torch.randint(0, cfg.vocab_size, (8, T))
    for chunk in (0, 1024):
        reset()
        v = validation_loss(wrapped, blocks, 4, accelerator, loss_chunk=chunk)
        rows.append({"what": "validation", "loss_chunk": chunk, "loss": v["loss"], "peak_GiB": peak()})
        print(json.dumps(rows[-1]), flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
