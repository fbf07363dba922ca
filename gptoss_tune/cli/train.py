"""`gptoss-tune train RECIPE [key=value ...]`, also `accelerate launch -m gptoss_tune.train RECIPE`."""

from __future__ import annotations

NAME = "train"
DESCRIPTION = (
    "Train LoRA on attention and every expert of gpt-oss from a recipe (docs/recipes.md). One process; for several "
    "GPUs run `accelerate launch [--config_file recipes/accelerate/...] -m gptoss_tune.train RECIPE`."
)


def add_arguments(p) -> None:
    p.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. train.lr=1e-4")


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="train a LoRA adapter from a YAML recipe", description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(run=run)


def run(args) -> int:
    # torch, transformers and accelerate: imported only when the command runs
    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    return train(recipe).exit_code
