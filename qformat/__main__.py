"""`python -m qformat` runs the command line."""

from qformat.cli.main import main

main()
