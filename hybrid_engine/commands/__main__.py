"""`python -m hybrid_engine.commands`: the same as the `hybrid-engine` command."""

import sys

from hybrid_engine.commands.main import main

sys.exit(main())
