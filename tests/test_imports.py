"""``import linearize`` registers the linearized architectures whatever the import order, without importing
transformers itself; the CLI's --help and ``linearize.kernels`` import neither transformers nor the model classes.
(Import *time* is measured, not asserted: see the closing notes / README.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

ORDERS = {
    "linearize-then-auto": "import linearize\nfrom transformers import AutoModelForCausalLM",
    "linearize-then-autoconfig-only": "import linearize\nfrom transformers import AutoConfig",
    "model-class-before-auto": "import linearize\nfrom transformers import LlamaForCausalLM\n"
                               "from transformers import AutoModelForCausalLM",
    "transformers-first": "from transformers import AutoModelForCausalLM\nimport linearize",
    "kernels-then-package": "import linearize.kernels\nimport linearize\nimport transformers",
    "peft-in-between": "import linearize\nimport peft\nfrom transformers import AutoModelForCausalLM",
}


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip()


@pytest.mark.parametrize("order", ORDERS, ids=list(ORDERS))
def test_registration_follows_any_import_order(order):
    out = _run(ORDERS[order] + "\nfrom transformers import AutoConfig\n"
               "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
               "print(sorted(k for k in CONFIG_MAPPING if k.startswith('linearized_')))")
    assert out.splitlines()[-1] == ("['linearized_gemma3_text', 'linearized_gpt2', 'linearized_llama', "
                                     "'linearized_mistral', 'linearized_phi3', 'linearized_qwen2', 'linearized_qwen3']")


def test_light_imports_do_not_load_transformers():
    out = _run("import sys\nimport linearize, linearize.cli.main, linearize.errors\n"
               "print('transformers' in sys.modules, 'torch' in sys.modules)\n"
               "import linearize.kernels\nprint('transformers' in sys.modules)")
    assert out.splitlines() == ["False False", "False"]


def test_cli_help_runs_without_transformers():
    out = _run("import sys\nsys.argv = ['linearize', '--help']\nfrom linearize.cli.main import main\n"
               "try:\n    main()\nexcept SystemExit:\n    pass\nprint('transformers' in sys.modules)")
    assert "convert" in out and out.splitlines()[-1] == "False"


def test_generated_flags_need_no_torch():
    """The verbs whose flags come from settings classes (convert, eval) build their help without torch: settings
    modules are declarations only."""
    out = _run("import sys\nsys.argv = ['linearize', 'convert', '--help']\nfrom linearize.cli.main import main\n"
               "try:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)")
    assert "--softmax-layers" in out and out.splitlines()[-1] == "False"
