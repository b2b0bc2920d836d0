"""The command line's old module path: `python -m hybrid_engine.cli ...` (as in `torchrun -m hybrid_engine.cli`) still
runs the `hybrid-engine` command, with a note on stderr; it lives in hybrid_engine.commands (`python -m
hybrid_engine.commands`)."""

import sys

from hybrid_engine.commands.main import main

__all__ = ["main"]

if __name__ == "__main__":
    print("note: `python -m hybrid_engine.cli` is now `python -m hybrid_engine.commands` (or the hybrid-engine "
          "command); the old path will be removed", file=sys.stderr)
    sys.exit(main())
