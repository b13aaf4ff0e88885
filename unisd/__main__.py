"""`python -m unisd ...` (and `torchrun -m unisd ...`) is the same as the `unisd` command."""
from unisd.cli import main

main()
