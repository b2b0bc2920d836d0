"""The `hybrid-engine` command line (main.py): flags, config files, summaries, tables, plots and logs over the
library. Nothing in the library imports this package."""
