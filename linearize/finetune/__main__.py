"""``python -m linearize.finetune RECIPE [...]`` = ``linearize finetune RECIPE [...]``, for launchers that take a
module (``accelerate launch -m linearize.finetune``, ``torchrun -m linearize.finetune``)."""

import sys

from linearize.cli.main import main

if __name__ == "__main__":
    sys.argv = ["linearize", "finetune", *sys.argv[1:]]
    main()
