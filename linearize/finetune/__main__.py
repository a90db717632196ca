"""``python -m linearize.finetune RECIPE [--set a.b=v ...] [--no-merge] [--dry-run] [--validate]``.

The same as ``linearize finetune`` / ``linearize validate``; handy with ``accelerate launch -m linearize.finetune``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linearize.errors import LinearizeError
from linearize.finetune.command import finetune_command, validate_command


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linearize.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override a recipe value (YAML-parsed), repeatable")
    ap.add_argument("--no-merge", action="store_true", help="export the base model plus a peft adapter/ folder")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    ap.add_argument("--validate", action="store_true", help="only validate the recipe")
    args = ap.parse_args(argv)
    try:
        if args.validate:
            validate_command(args.recipe, args.overrides)
        else:
            finetune_command(args.recipe, args.overrides, args.no_merge, args.dry_run)
    except LinearizeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
