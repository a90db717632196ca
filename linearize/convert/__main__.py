"""``python -m linearize.convert MODEL [...]`` = ``linearize convert MODEL [...]``, for launchers that take a module:
``torchrun --nproc_per_node N -m linearize.convert MODEL --out DIR ...`` runs attention transfer on N processes
(``accelerate launch -m linearize convert ...`` does the same through the ``linearize`` module)."""

import sys

from linearize.cli.main import main

if __name__ == "__main__":
    sys.argv = ["linearize", "convert", *sys.argv[1:]]
    main()
