"""The chunked finetuning loss (``finetune.loss_chunk``) on tiny models with random weights: the same loss and LoRA
gradients as the full-logits path, with and without distillation (shared and separate teacher), chunk sizes that
do and do not divide the rows; tied embeddings and a LoRA-adapted LM head; every supported family's head is a plain
``lm_head(hidden)``; the model's forward really returns hidden states and the head only ever sees chunks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from linearize.convert.surgery import linearize_model
from linearize.finetune import teacher as teachers
from linearize.finetune.config import DistillConfig, FinetuneConfig, LoRAConfig
from linearize.finetune.lora import apply_lora, trainable_parameters
from linearize.finetune.loss import causal_lm, chunked_loss, hidden_states_out, plain_head
from linearize.finetune.train import micro_batch_loss, train, validation_loss
from tests.conftest import linear_config, rel_err, tiny_model

VOCAB = 128
B, T = 2, 17  # 32 rows of B * (T - 1)
CHUNKS = (7, 8, 1000)  # does not divide, divides, larger than all rows


def _student(family, *, seed=0, targets=None, feature_maps=False, **overrides):
    model = linearize_model(tiny_model(family, seed=seed, vocab_size=VOCAB, **overrides),
                            linear_config(window=4), teacher=f"tiny-{family}")
    peft_model = apply_lora(model, LoRAConfig(rank=4, target_modules=targets), train_feature_maps=feature_maps,
                            seed=seed)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:  # B = 0 at init would leave every A gradient at zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return peft_model.train()


def _teacher(kind, peft_model, family):
    if kind == "shared":
        return teachers.shared(peft_model, peft_model)
    if kind == "separate":
        return teachers.separate(tiny_model(family, seed=3, vocab_size=VOCAB))
    return None


def _loss_and_grads(peft_model, ids, chunk, kd, teacher):
    peft_model.zero_grad(set_to_none=True)
    loss = micro_batch_loss(peft_model, ids, lm=causal_lm(peft_model), loss_chunk=chunk, kd=kd, teacher=teacher)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainable_parameters(peft_model)}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_same(peft_model, ids, kd, teacher):
    ref_loss, ref_grads = _loss_and_grads(peft_model, ids, 0, kd, teacher)
    assert sum(g.abs().sum() for g in ref_grads.values()) > 0
    for chunk in CHUNKS:
        loss, grads = _loss_and_grads(peft_model, ids, chunk, kd, teacher)
        assert rel_err(loss, ref_loss) < 1e-6, chunk
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], atol=1e-5, rtol=1e-5, msg=f"{n}, chunk {chunk}")


@pytest.mark.parametrize("kd", [None, "shared", "separate"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_chunked_equals_full_logits_random_weights(family, kd):
    peft_model = _student(family)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    distill = DistillConfig(weight=0.3, temperature=2.0) if kd else None
    _assert_same(peft_model, ids, distill, _teacher(kd, peft_model, family))


def test_lora_on_tied_lm_head_random_weights():
    """lm_head is a LoRA target and tied to the input embedding, feature maps train too: the adapter on the head
    gets the full-logits gradients, and the shared teacher's head is the head without LoRA."""
    peft_model = _student("llama", targets=["q_proj", "v_proj", "lm_head"], feature_maps=True,
                          tie_word_embeddings=True)
    lm = causal_lm(peft_model)
    assert lm.lm_head.base_layer.weight is lm.model.embed_tokens.weight
    names = [n for n, _ in trainable_parameters(peft_model)]
    assert any("lm_head.lora_A" in n for n in names) and any("linear_attn" in n for n in names)
    ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(2))
    teacher = teachers.shared(peft_model, peft_model)
    assert teacher.head is lm.lm_head.base_layer
    _assert_same(peft_model, ids, DistillConfig(weight=0.5, temperature=1.5), teacher)
    assert lm.lm_head.base_layer.weight is lm.model.embed_tokens.weight


def test_tied_gpt2_keeps_its_tie_random_weights():
    peft_model = _student("gpt2")
    lm = causal_lm(peft_model)
    assert lm.lm_head.weight is lm.transformer.wte.weight
    ids = torch.randint(0, VOCAB, (B, T))
    with hidden_states_out(lm) as head:
        assert isinstance(lm.get_output_embeddings(), nn.Identity) and head.weight is lm.transformer.wte.weight
        hidden = peft_model(input_ids=ids, use_cache=False).logits
    assert lm.get_output_embeddings() is head and lm.lm_head.weight is lm.transformer.wte.weight
    assert hidden.shape == (B, T, lm.config.hidden_size)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2"])
def test_every_family_applies_a_plain_head_random_weights(family):
    """In the installed transformers: the logits are exactly ``lm_head(final hidden states)`` for the softmax model
    and its linearized version, so the chunked path may take them apart."""
    ids = torch.randint(0, VOCAB, (B, T))
    for model in (tiny_model(family, vocab_size=VOCAB), _student(family).eval()):
        lm = causal_lm(model)
        head = plain_head(lm)
        assert head is lm.get_output_embeddings() and head is not None
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            with hidden_states_out(lm) as swapped:
                hidden = model(input_ids=ids, use_cache=False).logits
            assert swapped is head and lm.get_output_embeddings() is head
            assert hidden.shape == (B, T, lm.config.hidden_size)
            torch.testing.assert_close(head(hidden), logits, atol=1e-6, rtol=1e-6)


def test_unknown_forward_takes_the_full_logits_path_random_weights():
    base = type(tiny_model("llama", vocab_size=VOCAB))

    class Softcapped(base):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 30 * torch.tanh(out.logits / 30)
            return out

    torch.manual_seed(0)
    model = Softcapped(tiny_model("llama", vocab_size=VOCAB).config)
    assert plain_head(model) is None
    seen = []
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    ids = torch.randint(0, VOCAB, (B, T))
    loss = micro_batch_loss(model, ids, lm=model, loss_chunk=8)
    assert seen == [(B, T, model.config.hidden_size)] and loss.requires_grad


def test_plain_callable_teacher_takes_the_full_logits_path_random_weights():
    """A bare ``ids -> logits`` teacher (no head to chunk with): full logits for the step, the same loss."""
    peft_model = _student("llama")
    ids = torch.randint(0, VOCAB, (B, T))
    kd = DistillConfig(weight=0.5, temperature=2.0)
    teacher = teachers.shared(peft_model, peft_model)
    lm = causal_lm(peft_model)
    seen = []
    hook = lm.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].dim()))
    with torch.no_grad():
        bare = micro_batch_loss(peft_model, ids, lm=lm, loss_chunk=8, kd=kd, teacher=teacher.logits)
        assert seen == [3, 3]  # student and teacher forward, full logits
        chunked = micro_batch_loss(peft_model, ids, lm=lm, loss_chunk=8, kd=kd, teacher=teacher)
    hook.remove()
    assert set(seen[2:]) == {2} and rel_err(chunked, bare) < 1e-6


def test_chunked_loss_formula():
    """CE and KD chunk sums against the definition, on bare tensors (identity head: hidden = logits)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 9, 11, generator=g, requires_grad=True), torch.randn(3, 9, 11, generator=g)
    ids = torch.randint(0, 11, (3, 9), generator=g)
    from linearize.finetune.loss import distill_loss, next_token_loss

    ref = 0.25 * next_token_loss(s, ids) + 0.75 * distill_loss(s, t, 3.0)
    got = chunked_loss(s, ids, nn.Identity(), chunk=5, teacher_hidden=t, teacher_head=nn.Identity(), kd_weight=0.75,
                       temperature=3.0)
    assert rel_err(got, ref) < 1e-6
    (g_ref,) = torch.autograd.grad(ref, s)
    (g_got,) = torch.autograd.grad(got, s)
    torch.testing.assert_close(g_got, g_ref, atol=1e-7, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk must be > 0"):
        chunked_loss(s, ids, nn.Identity(), chunk=0)


# ---------------------------------------------------------------------------------------------------------------
# Through train() and validation_loss() with accelerate (CPU)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _record(peft_model):
    """Shapes the head's forward sees, and the last dim of every output of the model's forward (hooked on the
    PeftModel: peft 0.18 calls the inner model's ``forward`` directly, past its hooks)."""
    lm = causal_lm(peft_model)
    heads, outputs = [], []
    hooks = [lm.lm_head.register_forward_hook(lambda m, i, o: heads.append((tuple(i[0].shape), o.shape[-1]))),
             peft_model.register_forward_hook(lambda m, i, o: outputs.append(o.logits.shape[-1]))]
    return heads, outputs, hooks


@pytest.mark.parametrize("chunk", [0, 5])
def test_training_step_never_builds_full_logits_random_weights(tmp_path, accelerator, chunk):
    peft_model = _student("llama")
    train_ids = torch.randint(0, VOCAB, (8, T), generator=torch.Generator().manual_seed(4))
    cfg = FinetuneConfig(tokens=4 * T, seq_len=T, batch_size=4, micro_batch_size=2, loss_chunk=chunk,
                         checkpoint_every=0, kd=DistillConfig(weight=0.5, temperature=2.0))
    heads, outputs, hooks = _record(peft_model)
    result = train(peft_model, train_ids, cfg, seed=0, accelerator=accelerator, work_dir=tmp_path,
                   teacher=teachers.shared(peft_model, peft_model))
    for h in hooks:
        h.remove()
    assert result.finished and result.steps == 1
    d = peft_model.config.hidden_size
    if chunk:
        # 2 micro-batches x (student + teacher forward) returned hidden states, never logits
        assert outputs == [d] * 4
        # student head + teacher head per chunk, again in the backward's recomputation: 32 rows -> 7 chunks of <= 5
        assert heads and all(len(shape) == 2 and shape[0] <= chunk and v == VOCAB for shape, v in heads)
        assert len(heads) == 2 * 2 * 2 * 7
    else:
        assert outputs == [VOCAB] * 4 and heads == [((2, T, d), VOCAB)] * 4


def test_training_chunked_equals_full_logits_random_weights(tmp_path, accelerator):
    """Two optimizer steps with loss_chunk 0 and 6 end at the same LoRA weights and losses."""
    train_ids = torch.randint(0, VOCAB, (8, T), generator=torch.Generator().manual_seed(4))
    final = {}
    for chunk in (0, 6):
        peft_model = _student("gpt2")
        cfg = FinetuneConfig(tokens=8 * T, seq_len=T, batch_size=4, micro_batch_size=2, loss_chunk=chunk, lr=1e-2,
                             warmup=0.0, checkpoint_every=0, kd=DistillConfig(weight=0.5, temperature=2.0))
        trainable = [p for _, p in trainable_parameters(peft_model)]
        result = train(peft_model, train_ids, cfg, seed=0, accelerator=accelerator, work_dir=tmp_path / str(chunk),
                       teacher=teachers.shared(peft_model, peft_model))
        assert result.steps == 2
        final[chunk] = [p.detach().clone() for p in trainable], result.losses
    (w0, l0), (w6, l6) = final[0], final[6]
    assert l6 == pytest.approx(l0, rel=1e-5)
    for a, b in zip(w6, w0):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("teacher", [False, True])
def test_validation_loss_chunked_equals_full_random_weights(accelerator, teacher):
    """Also with the shared teacher's context on a LoRA-adapted head: the chunks run inside the context."""
    peft_model = _student("llama", targets=["q_proj", "lm_head"])
    blocks = torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(5))
    ctx = (lambda: teachers.shared_teacher(peft_model)) if teacher else None
    ref = validation_loss(peft_model, blocks, 2, accelerator, ctx, loss_chunk=0)
    heads, outputs, hooks = _record(peft_model)
    got = validation_loss(peft_model, blocks, 2, accelerator, ctx, loss_chunk=7)
    for h in hooks:
        h.remove()
    assert got["tokens"] == ref["tokens"] == 5 * (T - 1)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert outputs == [peft_model.config.hidden_size] * 3 and all(s[0] <= 7 for s, _ in heads)
    assert peft_model.training


def test_loss_chunk_setting(tmp_path):
    from pydantic import ValidationError

    from linearize.recipes import load_recipe

    assert FinetuneConfig().loss_chunk == 1024 and FinetuneConfig(loss_chunk=0).loss_chunk == 0
    with pytest.raises(ValidationError):
        FinetuneConfig(loss_chunk=-1)
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{source: {tmp_path}}}\noutput: {tmp_path / 'out'}\n")
    recipe = load_recipe(path, ["finetune.loss_chunk=64"])
    assert recipe.finetune.loss_chunk == 64
    # memory, not the run: a run may resume with another loss_chunk (e.g. lower after running out of memory)
    from linearize.finetune.pipeline import fingerprint

    assert fingerprint(recipe, str(tmp_path)) == fingerprint(load_recipe(path), str(tmp_path))
    assert "loss_chunk" not in fingerprint(recipe, str(tmp_path))["finetune"]
