"""What to do with the output directory: start fresh, resume, or refuse (and say why).

    resume: auto   continue from the newest intact checkpoint of the SAME run in output_dir, if any (a damaged
                   newer one is skipped, saying why, and set aside as checkpoints/damaged-step-N)
    resume: never  start fresh; output_dir must be empty or new (or overwrite: true to replace a run)
    resume: PATH   continue from that checkpoint (e.g. another run's checkpoints/step-N)

"The same run" means the settings in Recipe.fingerprint() match those in output_dir/recipe.yaml:
length, evaluation, checkpointing and logging may change on resume, the model, LoRA, data and optimiser
may not (that would be a different run; pass overwrite=true or choose another output_dir).

"Intact" means every file matches the size and sha256 its manifest.json recorded when it was written
(runs.checkpoint_problem); resume: PATH to a damaged checkpoint is refused with one line naming the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from gptoss_tune.errors import UserError
from gptoss_tune.runs import RECIPE, checkpoint_problem, holds_run, list_checkpoints, trained
from gptoss_tune.train.recipe import Recipe


@dataclass
class ResumePlan:
    mode: str  # "fresh" or "resume"
    checkpoint: Path | None = None
    wipe: bool = False  # delete output_dir's contents first (overwrite)
    # resume from a checkpoint of another run directory: a new run starting from its weights, optimizer
    # and data position, whose best checkpoint and early stopping start afresh (the old best is not here)
    branch: bool = False
    # newer checkpoints of the run that are damaged, and why: resume: auto continues from an older one
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def __str__(self) -> str:
        if self.mode == "resume":
            what = "will continue from" if not self.branch else "will start a new run from"
            return f"{what} {self.checkpoint}" + (" (replacing the run in the output directory)" if self.wipe else "")
        return "will replace the run in the output directory and start fresh" if self.wipe else "will start a fresh run"


def _flatten(d, prefix=""):
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), d


def _first_difference(a: dict, b: dict) -> str | None:
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    for k in sorted(set(fa) | set(fb)):
        if fa.get(k) != fb.get(k):
            return f"{k} is {fa.get(k)!r} there, {fb.get(k)!r} here"
    return None


def stored_fingerprint(out: Path) -> dict | None:
    try:
        raw = yaml.safe_load((out / RECIPE).read_text())
        return Recipe.model_validate(raw).fingerprint()
    except Exception:
        return None


def check_output_dir(recipe) -> ResumePlan:
    """Decide fresh / resume / refuse; raises UserError naming output_dir and the way out."""
    plan = _plan(recipe)
    if plan.mode == "resume" and recipe.resume != "auto":
        problem = checkpoint_problem(plan.checkpoint)  # before anything is written or loaded
        if problem is not None:
            raise UserError(
                f"{recipe.where('resume')}: resume={plan.checkpoint} is a damaged checkpoint: {problem}; "
                f"resume from another checkpoint (resume=auto picks the newest intact one of a run)"
            )
    return plan


def _plan(recipe) -> ResumePlan:
    src = recipe.where("output_dir")
    out = Path(recipe.output_dir)
    exists = out.is_dir() and any(out.iterdir())
    if recipe.resume not in ("auto", "never"):
        return _resume_from_path(recipe, out, exists, src)
    if not exists:
        return ResumePlan("fresh")
    if not holds_run(out):
        raise UserError(
            f"{src}: output_dir '{out}' is not empty and holds no gptoss-tune run; choose a new or empty directory"
        )
    ckpts = list_checkpoints(out)
    if not trained(out):
        # A run that stopped before its first step (a mistake in its data, model or settings): nothing in it
        # is worth keeping, and the corrected recipe must not be refused as "a different run".
        return ResumePlan("fresh", wipe=True)
    if recipe.resume == "never":
        if recipe.overwrite:
            return ResumePlan("fresh", wipe=True)
        raise UserError(
            f"{src}: output_dir '{out}' already holds a run ({len(ckpts)} checkpoint(s)); pass resume=auto to continue it, "
            f"overwrite=true to replace it, or choose another output_dir"
        )
    fp = stored_fingerprint(out)
    if fp is None or fp != recipe.fingerprint():
        if recipe.overwrite:
            return ResumePlan("fresh", wipe=True)
        why = "its recipe.yaml is missing or unreadable" if fp is None else _first_difference(fp, recipe.fingerprint())
        raise UserError(
            f"{src}: output_dir '{out}' holds a different run ({why}); choose another output_dir or pass overwrite=true to replace it"
        )
    if ckpts:
        return _newest_intact(out, ckpts, src)
    return ResumePlan("fresh", wipe=True)  # the same run, interrupted before its first checkpoint


def _newest_intact(out: Path, ckpts: list[tuple[int, Path]], src: str) -> ResumePlan:
    skipped = []
    for _, p in reversed(ckpts):
        problem = checkpoint_problem(p)
        if problem is None:
            return ResumePlan("resume", p, skipped=skipped)
        skipped.append((p, problem))
    p, why = skipped[0]
    raise UserError(
        f"{src}: output_dir '{out}' holds no intact checkpoint to resume from ({p.name}: {why}"
        + (f"; and {len(skipped) - 1} older one(s) damaged too" if len(skipped) > 1 else "")
        + "); pass overwrite=true to start the run over, or resume=PATH from another run's checkpoint"
    )


def _resume_from_path(recipe, out: Path, exists: bool, src: str) -> ResumePlan:
    """resume: PATH. Inside output_dir it continues that run (from its newest checkpoint, or from an earlier
    one if nothing newer is left); from elsewhere it starts a new run in output_dir (new, empty, or holding a
    run that overwrite replaces)."""
    ckpt = Path(recipe.resume)
    inside = _is_inside(ckpt, out)
    if not exists:
        return ResumePlan("resume", ckpt, branch=not inside)
    if not holds_run(out):
        raise UserError(
            f"{src}: output_dir '{out}' is not empty and holds no gptoss-tune run; choose a new or empty directory"
        )
    if not trained(out) and not inside:
        return ResumePlan("resume", ckpt, wipe=True, branch=True)
    fp = stored_fingerprint(out)
    if fp is not None and fp != recipe.fingerprint():
        why = _first_difference(fp, recipe.fingerprint())
        if not recipe.overwrite:
            raise UserError(
                f"{src}: output_dir '{out}' holds a different run ({why}); choose another output_dir or pass overwrite=true"
            )
        if inside:
            raise UserError(
                f"{src}: output_dir '{out}' holds a different run ({why}) and resume={ckpt} lies inside it, so "
                f"replacing that run would delete the checkpoint; choose another output_dir"
            )
        return ResumePlan("resume", ckpt, wipe=True, branch=True)
    skipped = []
    if inside:
        step = _step_of(ckpt)
        later = [(p, checkpoint_problem(p)) for s, p in list_checkpoints(out) if step is not None and s > step]
        newer = [p.name for p, problem in later if problem is None]
        if newer:
            raise UserError(
                f"{src}: resume={ckpt} is older than {', '.join(newer)} in the same run: continuing from it in place would "
                f"mix two histories; continue from the newest (resume=auto), or branch it into another output_dir"
            )
        skipped = later  # only damaged ones: set aside like resume: auto does
    elif recipe.overwrite:
        return ResumePlan("resume", ckpt, wipe=True, branch=True)
    else:
        raise UserError(
            f"{src}: output_dir '{out}' already holds a run with checkpoints; continue it with resume=auto, "
            f"replace it with overwrite=true, or choose another output_dir to start a new run from {ckpt}"
        )
    return ResumePlan("resume", ckpt, skipped=skipped)


def _is_inside(path: Path, directory: Path) -> bool:
    try:
        Path(path).resolve().relative_to(Path(directory).resolve())
        return True
    except ValueError:
        return False


def _step_of(ckpt: Path) -> int | None:
    try:
        return int(json.loads((Path(ckpt) / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
