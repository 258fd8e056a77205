"""`python launch.py COMMAND ...`: the project's command line (shufflenet_jax/cli.py has the
commands; `shufflenet-jax COMMAND ...` is the same after `pip install .`)."""

from shufflenet_jax import cli

if __name__ == "__main__":
  cli.run()
