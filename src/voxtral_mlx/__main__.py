"""`python -m voxtral_mlx`: the `voxtral-mlx` command."""

from .cli import main

main()
