"""`python -m shufflenet_jax COMMAND ...` = launch.py = the `shufflenet-jax` console script."""

from shufflenet_jax import cli

cli.run()
