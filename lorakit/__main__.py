"""``python -m lorakit``: the same command line as ``lorakit``."""

from lorakit.cli import main

main()
