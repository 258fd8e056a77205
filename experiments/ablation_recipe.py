"""Ablation: the paper's recipe vs the official code's (label smoothing, colour jitter, BGR input,
wider crop scale; configs/common.py `imagenet_recipe`).

Paper cells: the papers' errors; official cells: the official code's retrained results.
Under `proxy` both recipes become the same Fashion-MNIST recipe: run this one at full scale.
  python launch.py sweep --experiment=experiments/ablation_recipe.py --root=runs/recipe --dry_run
  python launch.py report --experiment=experiments/ablation_recipe.py --root=runs/recipe
"""

from configs import shufflenet_v2

TITLE = "Ablation: the paper's training recipe vs the official code's"
# (model, scale) -> (paper recipe error %, official recipe error %)
PAPER = {("v1", 0.5): (43.2, 42.7), ("v1", 1.0): (32.6, 32.2), ("v1", 2.0): (26.3, 25.9),
         ("v2", 1.0): (30.6, 30.6)}


def get_config(arg: str | None = None):
  return shufflenet_v2.v2_or_v1_g3(arg, default="v1")


def sweep(add):
  for (model, scale), errors in PAPER.items():
    name = f"ShuffleNet {model} {scale:g}x" + (" (g = 3)" if model == "v1" else "")
    for recipe, paper in zip(("paper", "official"), errors):
      add(row=name, col=f"recipe={recipe}", family=f"recipe={recipe}", paper=paper,
          model=model, scale=scale, recipe=recipe)
