"""Why generate() on a tiny fp32 model did not replay the decode graph (#13): run it with graphs on and print, per
generate() call, what the cache's graph state saw (eager steps, capture failure, replays) and every warning.
    python benchmarks/gpu_graph_diag.py        (on a CUDA machine, repo root)"""
import warnings

import torch

from linearize.convert.surgery import linearize_model
from linearize.models import graphs
from linearize.modules.attention import LinearAttentionConfig
from tests.conftest import tiny_model

seen = []
run = graphs.GraphedDecoding.run


def traced(self, cache, input_ids, *a, **k):
    out = run(self, cache, input_ids, *a, **k)
    seen.append((self.eager_steps, self.failed, self.graph is not None and self.graph.captured,
                 0 if self.graph is None else self.graph.replays))
    return out


graphs.GraphedDecoding.run = traced
ready = graphs.graph_ready
verdicts = []


def traced_ready(*a, **k):
    r = ready(*a, **k)
    verdicts.append(r)
    return r


graphs.graph_ready = traced_ready
for dtype in (torch.float32, torch.bfloat16):
    for sinks in (0, 4):
        model = linearize_model(tiny_model("llama", 0), LinearAttentionConfig(window=8, sinks=sinks)).eval()
        model = model.to("cuda", dtype)
        ids = torch.randint(1, 96, (3, 11), device="cuda")
        seen.clear(), verdicts.clear()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            model.generate(input_ids=ids, max_new_tokens=24, do_sample=False, pad_token_id=0)
        print(f"{dtype} sinks={sinks}: graph_ready verdicts {verdicts.count(True)} true / {len(verdicts)}; "
              f"last state (eager, failed, captured, replays) {seen[-1] if seen else None}; steps seen {len(seen)}")
        for x in w:
            if "graph" in str(x.message).lower() or "capture" in str(x.message).lower():
                print("   warning:", str(x.message)[:400])
