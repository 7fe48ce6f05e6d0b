"""`python -m reforge ...` runs the CLI (useful under `torchrun -m` / `accelerate launch -m`)."""

from reforge.cli import main

main()
