"""`python -m badge.cli ...` (as torchrun starts it) runs the `badge` command."""

from badge.cli import main

main()
