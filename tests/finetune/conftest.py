"""Fixtures of the finetuning tests: a tiny linearized model, a character tokenizer and a recipe writer."""

from __future__ import annotations

import string

import pytest
import torch
import yaml

from linearize.convert.surgery import linearize_model
from linearize.export.writer import save_linearized
from tests.conftest import linear_config, tiny_model

VOCAB = 128



def linearized(family, **attn):
    return linearize_model(tiny_model(family, vocab_size=VOCAB), linear_config(**attn), teacher=f"tiny-{family}")


def char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.printable[:95])
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture
def tiny_run(tmp_path):
    """A linearized tiny Llama export + text data + a recipe writer."""
    model = linearized("llama", window=4)
    save_linearized(model, tmp_path / "base", tokenizer=char_tokenizer())
    words = "the cat sat on a mat and the dog ran to the park while birds sang in old trees".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g).tolist()) for _ in range(400)]
    (tmp_path / "data.txt").write_text("\n".join(lines))

    def write(name="recipe.yaml", **finetune):
        recipe = {
            "model": {"source": str(tmp_path / "base")},
            "finetune": {"data": str(tmp_path / "data.txt"), "tokens": 8 * 64 * 6, "seq_len": 64, "batch_size": 8,
                         "micro_batch_size": 4, "lr": 3e-3, "checkpoint_every": 0, "eval_batch_size": 8,
                         "lora": {"rank": 4, "dropout": 0.1}, "kd": {"weight": 0.5, "temperature": 2.0}, **finetune},
            "output": str(tmp_path / "run"),
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(recipe))
        return path

    return tmp_path, write
