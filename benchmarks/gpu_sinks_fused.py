"""Forward + backward time of the fused sinks kernel (``linearize/kernels/hybrid/sinks_fused.py``) against the
PyTorch form ``sinks.add_sinks``, bf16, at attention-transfer shapes (seq 2048, 4 sinks, W 64), with the relative
errors of the output and of the gradients of o, den, c, gamma beside the times. Its bf16 parity is a test:
``python -m pytest tests/gpu/test_gpu_sinks.py`` (this script was the timing half of gpu_check_sinks.py).
    python benchmarks/gpu_sinks_fused.py OUT.json        (needs a CUDA GPU)
Prints one line per shape; the JSON holds the errors and times."""
import argparse
import json

SHAPES = {  # name: (B, H, Hk, T, d = D); the same shapes as tests/gpu/test_gpu_sinks.py
    "llama-2-7b": (8, 32, 32, 2048, 128),
    "llama-3-8b": (8, 32, 8, 2048, 128),
    "smollm2-135m": (16, 9, 3, 1024, 64),
}


def _inputs(B, H, Hk, T, d, E=4, W=64):
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    o = r(B, H, T, d).bfloat16().requires_grad_()
    den = (r(B, H, T).abs() * 4 + 1).requires_grad_()
    c = r(B, H, T).requires_grad_()
    gamma = torch.rand(H, device="cuda").requires_grad_()
    q, k_s, v_s = (r(B, H, T, d) * 2).bfloat16(), (r(B, Hk, E, d) * 2).bfloat16(), r(B, Hk, E, d).bfloat16()
    pos = torch.arange(E, device="cuda").expand(B, E).contiguous()
    return (o, den, c, q, (k_s, v_s, pos), gamma), dict(scale=d**-0.5, window=W, first_query=0)


def _rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def main(out: str) -> None:
    import torch

    from linearize.kernels.hybrid.sinks import add_sinks
    from linearize.kernels.hybrid.sinks_fused import add_sinks_fused

    rows = []
    for name, shape in SHAPES.items():
        args, kw = _inputs(*shape)
        o, den, c, q, sinks, gamma = args
        leaves = [o, den, c, gamma]
        w = torch.randn_like(o)
        res = {}
        for form, fn in (("torch", add_sinks), ("fused", add_sinks_fused)):
            y = fn(*args, **kw)
            res[form] = [y] + list(torch.autograd.grad((y.float() * w.float()).sum(), leaves))

            def step(fn=fn):
                y = fn(*args, **kw)
                torch.autograd.grad((y.float() * w.float()).sum(), leaves)
            res[form + "_ms"] = _ms(step)
        errs = {k: _rel(a, b) for k, a, b in zip(("out", "do", "dden", "dc", "dgamma"), res["fused"], res["torch"])}
        row = {"shape": name, "B_H_Hk_T_d": shape, "errors": errs, "torch_ms": res["torch_ms"],
               "fused_ms": res["fused_ms"], "pass": all(e < 1e-2 for e in errs.values())}
        print(("PASS" if row["pass"] else "FAIL"), row, flush=True)
        rows.append(row)
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="JSON file for the errors and times")
    main(ap.parse_args().out)
