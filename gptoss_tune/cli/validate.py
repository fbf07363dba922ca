"""`gptoss-tune validate RECIPE [key=value ...]`: check a recipe without running it."""

from __future__ import annotations

from pathlib import Path

NAME = "validate"


def add_parser(sub) -> None:
    p = sub.add_parser(
        NAME,
        help="check a training recipe without running it",
        description="Read a recipe, apply key.sub=value overrides, fill in defaults and check every key, path and the "
        "output directory; print what training would do. Exit status 2 with a one-line error otherwise.",
    )
    p.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. train.lr=1e-4")
    p.add_argument("--print", action="store_true", help="print the resolved recipe (every default filled in)")
    p.set_defaults(run=run)


def run(args) -> int:
    # pydantic and the checkpoint reader: imported only when the command runs
    from gptoss_tune.train.checkpoint import read_trainer_state
    from gptoss_tune.train.datafiles import check_data_files
    from gptoss_tune.train.recipe import load_recipe
    from gptoss_tune.train.resume import check_output_dir

    recipe = load_recipe(args.recipe, args.overrides)
    plan = check_output_dir(recipe)
    check_data_files(recipe, plan, Path(recipe.output_dir))  # a resumed run whose data changed: refused here too
    if plan.mode == "resume":
        try:
            state = read_trainer_state(plan.checkpoint)
        except (OSError, ValueError):
            state = {}
        if state.get("finished"):
            plan = (
                f"{plan} (the run finished at step {state.get('step')}, {state.get('stop_reason')}: training "
                f"continues only if train.max_steps / train.epochs (or early_stopping.patience) now ask for more; "
                f"resume=never overwrite=true starts over)"
            )
    if args.print:
        print(recipe.to_yaml(), end="")
    print(f"{args.recipe}: valid; {plan}")
    return 0
