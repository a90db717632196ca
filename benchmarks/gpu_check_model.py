"""GPU check: a converted model runs forward, backward and generate() on the Triton kernels and matches the
PyTorch path. SmolLM2-135M geometry (9 query / 3 kv heads, head_dim 64), random weights, hybrid W=64 and pure.

    PYTHONPATH=. python benchmarks/gpu_check_model.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from linearize.convert.surgery import linearize_model
from linearize.modules.attention import LinearAttentionConfig


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def main() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192)
    print("| mode | dtype | logits rel err | grad rel err (phi, gamma) | generate equal |", flush=True)
    for window in (64, 0):
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = linearize_model(LlamaForCausalLM(cfg), LinearAttentionConfig(window=window)).cuda().to(dtype)
            model.eval()
            ids = torch.randint(0, 4096, (2, 700), device="cuda")
            out = {}
            for backend in ("torch", "auto"):
                model.set_backend(backend)
                model.zero_grad(set_to_none=True)
                logits = model(ids, use_cache=False).logits
                logits.float().pow(2).mean().backward()
                grads = torch.cat([p.grad.flatten().float() for n, p in model.named_parameters()
                                   if "linear_attn" in n and p.grad is not None])
                gen = model.generate(ids[:, :100], max_new_tokens=40, do_sample=False, pad_token_id=0)
                out[backend] = (logits.detach(), grads, gen)
            t, a = out["torch"], out["auto"]
            print(f"| {'hybrid W=64' if window else 'pure'} | {str(dtype).split('.')[-1]} | {rel(a[0], t[0]):.2e} | "
                  f"{rel(a[1], t[1]):.2e} | {bool(torch.equal(a[2], t[2]))} "
                  f"({(a[2] == t[2]).float().mean().item():.3f} tokens equal) |", flush=True)


if __name__ == "__main__":
    main()
