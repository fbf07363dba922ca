"""The training loop: `accelerate launch -m gptoss_tune.train RECIPE.yaml [key=value ...]`.

Same as `gptoss-tune train RECIPE.yaml [key=value ...]` (one process). One optimizer step:

1. take the next P*G micro-batches of the stream (P processes, G = train.grad_accum; gptoss_tune.train.stream),
2. count the trained tokens N of the whole step over all processes (one small all-reduce),
3. for each micro-batch: LM loss sum * P*G/N + router.aux_loss_coef * load-balancing loss, backward
   (accelerate divides by G and DDP averages over P, so the step's gradient is exactly that of
   sum(token losses)/N + coef * mean(aux): every trained token weighs the same wherever it falls),
4. stop on a NaN/inf loss or gradient norm before the update, clip, AdamW, schedule,
5. log, evaluate every eval.every_steps, checkpoint, early-stop; SIGINT/SIGTERM save and exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptoss_tune.atomic_io import atomic_write_text, fsync_path
from gptoss_tune.errors import UserError
from gptoss_tune.runs import CHECKPOINTS, DATA_REPORT, FINAL, METRICS, RECIPE, step_dir_name
from gptoss_tune.train.memory import apply_memory_settings, build_optimizer
from gptoss_tune.train.recipe import Recipe, load_recipe
from gptoss_tune.train.schedule import apply_recipe_hyperparameters, lr_lambda
from gptoss_tune.train.state import TrainerState
from gptoss_tune.train.stream import MicroBatchStream, TrainData, eval_batches, load_train_data


class TrainingDiverged(UserError):
    """The loss or gradient became NaN/inf: the run stops without applying that step."""

    exit_code = 3


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    stop_reason: str  # "completed", "early_stopping", "interrupted", "already_finished"
    best_step: int | None = None
    best_eval_loss: float | None = None
    evals: list[dict] = field(default_factory=list)
    final_dir: Path | None = None
    exit_code: int = 0


# ---- small pieces ----------------------------------------------------------------------------------


class StopSignal:
    """SIGINT/SIGTERM set a flag; the loop saves at the end of the current step and exits. A second
    signal interrupts at once (the checkpoint being written is atomic, so nothing is lost)."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def install(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum
        print(
            f"\nreceived {signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping "
            f"(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def restore(self):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _trained_in(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def _gather_trainable(accelerator, module) -> dict | None:
    """Full trainable tensors for saving when parameters are sharded (FSDP2 DTensors, DeepSpeed ZeRO-3);
    every process must call this. None when parameters are whole (single process, DDP)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return None
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            for n, p in named:
                out[n] = p.detach().to("cpu", copy=True)
    else:
        for n, p in named:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = t.detach().to("cpu", copy=True)
    return out


def _train_routers(model) -> None:
    """Make every layer's router (weight and bias) trainable, kept in fp32 like the LoRA weights: bf16
    would round small AdamW updates away. Its input is cast to fp32 too, so the router also runs where no
    autocast does (a bf16 model with train.mixed_precision: no); under autocast its matmul is bf16 as before."""
    for layer in model.model.layers:
        router = layer.mlp.router
        router.float().requires_grad_(True)
        router.register_forward_pre_hook(_input_to_weight_dtype)


def _input_to_weight_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def _check_token_ids(recipe, data) -> None:
    """Every token id of the data must exist in the model's vocabulary (a smaller custom vocabulary would
    fail deep inside the embedding lookup instead)."""
    from gptoss_tune.model.checkpoint import read_config, resolve_model_dir

    vocab = read_config(resolve_model_dir(recipe.model.path))["vocab_size"]
    for split, rows in (("train", data.train), ("validation", data.validation)):
        top = max((max(r["input_ids"]) for r in rows if r["input_ids"]), default=-1)
        if top >= vocab:
            raise UserError(
                f"{recipe.where('model', 'path')}: model.path: the {split} data holds token id {top}, but the model's "
                f"vocabulary has {vocab} tokens; gpt-oss needs the o200k_harmony vocabulary (201,088 tokens)"
            )


def _mode(accelerator) -> str:
    t = str(accelerator.distributed_type).split(".")[-1]
    return (
        ""
        if t == "NO"
        else f" ({'DDP' if t.startswith('MULTI_') else t}{', ' + accelerator.mixed_precision if accelerator.mixed_precision != 'no' else ''})"
    )


# ---- the run ---------------------------------------------------------------------------------------


def train(recipe: Recipe, data: TrainData | None = None) -> TrainResult:
    """Run a recipe (in every process of a launch). Returns what happened; raises UserError on bad input
    and TrainingDiverged on a NaN/inf loss."""
    import warnings

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    from gptoss_tune.train.resume import lock_run_dir

    # torch >= 2.12 renames DDP's broadcast_buffers; the MXFP4 buffers are excluded from DDP below either way.
    warnings.filterwarnings("ignore", message=".*broadcast_buffers. is deprecated", category=FutureWarning)
    cfg_t = recipe.train
    cuda = torch.cuda.is_available()
    mixed = cfg_t.mixed_precision if cfg_t.mixed_precision != "auto" else ("bf16" if cuda else "no")
    accelerator = Accelerator(
        # Without a GPU, processes started by torchrun (`accelerate launch --multi_gpu`) talk over gloo.
        cpu=not cuda,
        mixed_precision=mixed,
        gradient_accumulation_steps=cfg_t.grad_accum,
        # MXFP4 experts are uint8 buffers (10 GB for 20b): never re-broadcast them every step.
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )
    lock = lock_run_dir(Path(recipe.output_dir), recipe.where("output_dir")) if accelerator.is_main_process else None
    try:
        return _train(recipe, data, accelerator, mixed)
    finally:
        if lock is not None:
            os.close(lock)


def _train(recipe: Recipe, data: TrainData | None, accelerator, mixed: str) -> TrainResult:
    from accelerate.utils import DistributedType, set_seed

    from gptoss_tune.model.adapter import load_adapter_weights, read_adapter_config, save_adapter
    from gptoss_tune.model.experts import MXFP4Experts
    from gptoss_tune.model.loader import load_model
    from gptoss_tune.train import checkpoint as ck
    from gptoss_tune.train.losses import expert_load_stats
    from gptoss_tune.train.objective import Objective
    from gptoss_tune.train.resume import check_output_dir, truncate_metrics, wipe
    from gptoss_tune.train.tracking import Tracker

    t_start = time.time()
    cfg_t = recipe.train
    P, G, rank, main = (
        accelerator.num_processes,
        cfg_t.grad_accum,
        accelerator.process_index,
        accelerator.is_main_process,
    )
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    run_dir = Path(recipe.output_dir)

    def say(text: str) -> None:
        if main:
            print(text, flush=True)

    # -- output directory: every process decides from the same files, then only the main one writes.
    plan = check_output_dir(recipe)
    accelerator.wait_for_everyone()
    state = TrainerState.from_dict(ck.read_trainer_state(plan.checkpoint)) if plan.mode == "resume" else None
    if main:
        if plan.wipe and run_dir.exists():
            wipe(run_dir)
        (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        ck.clean_stale(run_dir)
        atomic_write_text(run_dir / RECIPE, recipe.to_yaml())
        if state is not None:
            truncate_metrics(run_dir / METRICS, state.step)
        elif (run_dir / METRICS).exists():
            (run_dir / METRICS).unlink()
    accelerator.wait_for_everyone()

    # -- data
    if data is None:
        data = load_train_data(recipe)
    if not data.train:
        raise UserError(
            f"{recipe.where('data', 'train')}: data.train: no training examples after rendering and filtering"
        )
    if main:
        atomic_write_text(run_dir / DATA_REPORT, json.dumps(data.report, indent=2, default=str) + "\n")
        from gptoss_tune.data.pipeline import format_report

        if isinstance(data.report.get("train"), dict):
            say(format_report(data.report, listed=3) + f"\n  (data report: {run_dir / DATA_REPORT})")
    _check_token_ids(recipe, data)
    evaluating = bool(data.validation)
    if recipe.early_stopping.enabled and not evaluating:
        raise UserError(
            f"{recipe.where('early_stopping')}: early_stopping needs validation examples, and the validation set is empty; "
            f"raise data.val_fraction or set data.validation, or early_stopping.enabled=false"
        )
    stream = MicroBatchStream(data.train, cfg_t.micro_batch_size, cfg_t.seed, recipe.data.packing)
    per_step = P * G
    start_step = state.step if state else 0
    mb_consumed = (
        stream.position_from(
            state.micro_batches_consumed,
            state.micro_batch_size if state.micro_batch_size is not None else cfg_t.micro_batch_size,
        )
        if state
        else 0
    )
    if cfg_t.epochs is not None:
        total_mb = stream.total_micro_batches(cfg_t.epochs)
        total_steps = start_step + max(0, math.ceil((total_mb - mb_consumed) / per_step))
    else:
        total_steps = cfg_t.max_steps
    if cfg_t.max_steps is not None:
        total_steps = min(total_steps, cfg_t.max_steps)
    total_steps = max(total_steps, start_step)
    if state is not None and state.finished:
        stopped_early = (
            state.stop_reason == "early_stopping"
            and recipe.early_stopping.enabled
            and not plan.branch
            and state.evals_without_improvement >= recipe.early_stopping.patience
        )
        if stopped_early or total_steps <= start_step:
            say(
                f"{plan.checkpoint if plan.branch else run_dir}: this run already finished at step {start_step} ({state.stop_reason}); nothing to do. "
                f"Raise train.max_steps / train.epochs (or early_stopping.patience) to continue it, "
                f"or pass resume=never overwrite=true to start over."
            )
            return TrainResult(run_dir, start_step, "already_finished")

    # -- model: identical LoRA initialisation on every process, then per-process RNG streams.
    set_seed(cfg_t.seed)
    dtype = None if recipe.model.dtype == "auto" else recipe.model.dtype
    device = accelerator.device if accelerator.device.type != "cpu" else torch.device("cpu")  # multi-CPU says cpu:0
    model = load_model(
        recipe.model.path,
        lora=recipe.lora.to_settings(),
        device=device,
        dtype=dtype,
        attn_implementation=recipe.model.attn_implementation,
    )
    backends = set()
    for m in model.modules():
        if isinstance(m, MXFP4Experts):
            m.backend = recipe.model.experts_backend
            backends.add(
                m.resolved_backend(device)
            )  # a backend that cannot run here is a one-line error now, not at the first step
    runs_on = (
        f"on {device} in {str(next(model.parameters()).dtype).replace('torch.', '')}; experts: "
        f"{'/'.join(sorted(backends)) or 'none'}; attention: {model.config._attn_implementation}"
    )
    if recipe.router.train:
        _train_routers(model)
    if state is not None and sharded and state.num_processes != P:
        raise UserError(
            f"{plan.checkpoint}: written by {state.num_processes} processes with sharded optimizer state; "
            f"resume it with --num_processes {state.num_processes}"
        )
    if state is not None:
        meta = read_adapter_config(plan.checkpoint)
        if meta.get("lora") != recipe.lora.to_settings().to_dict():
            raise UserError(
                f"{plan.checkpoint}: trained with lora {meta.get('lora')}, the recipe says {recipe.lora.to_settings().to_dict()}"
            )
        load_adapter_weights(model, plan.checkpoint)
    # Checkpointing (non-reentrant, per decoder layer, optional host offload) and the optimizer come from
    # gptoss_tune.train.memory, the same code path scripts/bench_train.py measures.
    memory = apply_memory_settings(model, cfg_t.memory_settings())
    model.config.use_cache = False
    model.train()
    objective = Objective(model, chunk_tokens=cfg_t.loss_chunk_tokens)
    trainable = [p for p in objective.parameters() if p.requires_grad]
    if accelerator.distributed_type in (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Frozen weights and MXFP4 buffers are identical on every process (same checkpoint): skip their
        # broadcast when DDP wraps the model (10 GB for 20b).
        frozen = [n for n, p in objective.named_parameters() if not p.requires_grad] + [
            n for n, _ in objective.named_buffers()
        ]
        DDP._set_params_and_buffers_to_ignore_for_model(objective, frozen)
    optimizer = build_optimizer(
        trainable,
        memory.optimizer,
        lr=cfg_t.lr,
        betas=(cfg_t.adam_beta1, cfg_t.adam_beta2),
        eps=cfg_t.adam_eps,
        weight_decay=cfg_t.weight_decay,
    )
    warmup = math.ceil(cfg_t.warmup_ratio * total_steps) if state is None else state.warmup_steps
    schedule = lr_lambda(total_steps, warmup, cfg_t.scheduler, cfg_t.min_lr_ratio)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed owns the optimizer step and steps the schedule itself; it cannot infer the micro-batch
        # size without a prepared DataLoader. (Not exercised in CI: no GPUs there.)
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg_t.micro_batch_size
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        objective, optimizer, scheduler = accelerator.prepare(objective, optimizer, scheduler)
    else:
        objective, optimizer = accelerator.prepare(objective, optimizer)
        # Stepped here once per optimizer step (accelerate's wrapper would step it once per process).
        scheduler = torch.optim.lr_scheduler.LambdaLR(getattr(optimizer, "optimizer", optimizer), schedule)
    trainable = [p for p in objective.parameters() if p.requires_grad]  # FSDP2 replaces them with DTensors
    unwrapped = accelerator.unwrap_model(objective)

    # -- resume trainer state
    best_step = best_value = None
    bad_evals = 0
    tokens_seen = 0
    evals: list[dict] = []
    if state is not None:
        ck.load_optimizer_state(plan.checkpoint, optimizer, rank, sharded, accelerator.device)
        ck.load_scheduler_state(plan.checkpoint, scheduler)
        apply_recipe_hyperparameters(optimizer, scheduler, schedule, cfg_t)
        if plan.branch:
            # A new run from another run's checkpoint: its best checkpoint is not in this directory, and its
            # validation data may differ; the best adapter and early stopping start afresh here.
            say(
                f"note: starting a new run in {run_dir} from {plan.checkpoint} (step {start_step}): the best checkpoint "
                f"and early stopping start afresh"
            )
        else:
            best_step, best_value = state.best_step, state.best_value
            bad_evals = state.evals_without_improvement
            evals = state.evals
        tokens_seen = state.tokens_seen
        if not ck.load_rng_state(plan.checkpoint, rank) or state.num_processes != P:
            set_seed(cfg_t.seed + 1000 * start_step + rank)
            say(
                f"note: the checkpoint was written by {state.num_processes} process(es), this run has {P}: "
                f"data position is kept, random streams (dropout) restart"
            )
    else:
        set_seed(cfg_t.seed + rank)  # dropout differs between processes, as data does

    # The checkpoint resumed from is this run's (nothing to write again at its step) unless it lies elsewhere.
    saved_steps: set[int] = {start_step} if state is not None and not plan.branch else set()
    last_ckpt: Path | None = plan.checkpoint if state is not None else None

    def trainer_state(step, finished=False, stop_reason=None) -> dict:
        return TrainerState(
            step=step,
            micro_batches_consumed=mb_consumed,
            epoch=round(stream.epoch_at(mb_consumed), 6),
            num_processes=P,
            grad_accum=G,
            micro_batch_size=cfg_t.micro_batch_size,
            total_steps=total_steps,
            warmup_steps=warmup,
            best_step=best_step,
            best_value=best_value,
            evals_without_improvement=bad_evals,
            tokens_seen=tokens_seen,
            evals=evals,
            finished=finished,
            stop_reason=stop_reason,
            fingerprint=recipe.fingerprint_hash(),
        ).to_dict()

    def save_checkpoint(step: int, **flags) -> Path:
        nonlocal last_ckpt
        path = run_dir / CHECKPOINTS / step_dir_name(step)
        if step in saved_steps:
            # Same weights, optimizer and RNG; the bookkeeping may have changed since (an evaluation at this
            # step made it the best, the run finished here): write that, and best.json.
            if main:
                atomic_write_text(path / ck.TRAINER_STATE, json.dumps(trainer_state(step, **flags), indent=2) + "\n")
                if best_step is not None:
                    ck.write_best(run_dir, best_step, best_value)
            accelerator.wait_for_everyone()
            return path
        if main:
            ck.prepare_tmp(run_dir, step)
        accelerator.wait_for_everyone()
        adapter_state = _gather_trainable(accelerator, unwrapped.model)
        ck.write_checkpoint_files(
            ck.tmp_dir_for(run_dir, step),
            rank=rank,
            is_main=main,
            sharded=sharded,
            model=unwrapped.model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=trainer_state(step, **flags),
            adapter_state=adapter_state,
        )
        accelerator.wait_for_everyone()
        if main:
            ck.commit(run_dir, step)
            if best_step is not None:
                ck.write_best(run_dir, best_step, best_value)
            ck.prune(run_dir, recipe.checkpoint.keep, best_step)
        accelerator.wait_for_everyone()
        saved_steps.add(step)
        last_ckpt = path
        return path

    val_batches = []
    if evaluating:
        val_batches = eval_batches(
            data.validation,
            recipe.eval.micro_batch_size or cfg_t.micro_batch_size,
            recipe.data.packing,
            P,
            rank,
            recipe.eval.max_batches,
        )

    def evaluate(step: int) -> dict:
        nonlocal best_step, best_value, bad_evals
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            for batch, weight in val_batches:
                out = unwrapped(**_to_device(batch, accelerator.device), evaluate=True)
                if weight:
                    sums += torch.stack(
                        [
                            out.lm_loss_sum.double(),
                            out.trained_tokens.double(),
                            out.correct.double(),
                            out.aux_loss.double(),
                        ]
                    )
        model.train()
        sums = accelerator.reduce(sums, "sum")
        n = max(sums[1].item(), 1.0)
        loss = sums[0].item() / n
        # The best adapter is the lowest validation loss, however small the gain; min_delta only decides
        # whether an evaluation resets the patience count (as transformers' EarlyStoppingCallback does).
        improved_enough = best_value is None or loss < best_value - recipe.early_stopping.min_delta
        improved = best_value is None or loss < best_value
        if improved:
            best_step, best_value = step, loss
        bad_evals = 0 if improved_enough else bad_evals + 1
        rec = {
            "step": step,
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_accuracy": sums[2].item() / n,
            "eval_tokens": int(sums[1].item()),
            "best_eval_loss": best_value,
            "best_step": best_step,
            "evals_without_improvement": bad_evals,
        }
        evals.append({"step": step, "eval_loss": loss})
        if main:
            tracker.eval_step(rec)
        if improved:
            save_checkpoint(step)  # the best adapter is always a checkpoint (best.json points to it)
        return rec

    tracker = Tracker(recipe, run_dir, total_steps, start_step) if main else None
    n_params = sum(p.numel() for p in trainable)
    say(
        f"training {recipe.model.path} with LoRA r={recipe.lora.rank} on {', '.join(recipe.lora.attention + recipe.lora.experts) or 'nothing'}"
        f"{' + router' if recipe.router.train else ''}: {n_params:,} trainable parameters; {len(data.train)} train rows, "
        f"{len(data.validation)} validation rows; {P} process(es){_mode(accelerator)} x {G} accumulation x {cfg_t.micro_batch_size} rows per step; "
        f"steps {start_step}->{total_steps}"
        + (f" (resumed from {plan.checkpoint})" if state else "")
        + f"; {runs_on}; writing to {run_dir}"
    )

    stop = StopSignal().install()
    stop_reason = "completed"
    step = start_step
    last_eval_step = start_step if (state and evals and evals[-1]["step"] == start_step) else None
    coef = recipe.router.aux_loss_coef
    n_layers = model.config.num_hidden_layers
    try:
        if evaluating and recipe.eval.at_start and state is None:
            evaluate(0)  # the untrained adapter (B = 0): the base model's loss
            last_eval_step = 0
        while step < total_steps:
            t0 = time.time()
            batches = [stream.batch(i) for i in stream.step_indices(mb_consumed, P, G, rank)]
            local = torch.tensor([float(sum(_trained_in(b) for b in batches))], device=accelerator.device)
            n_trained = accelerator.reduce(local, "sum").item()
            scale = per_step / max(n_trained, 1.0)
            lm_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            aux_sum = torch.zeros((), device=accelerator.device, dtype=torch.float64)
            counts = torch.zeros(n_layers, unwrapped.num_experts, device=accelerator.device)
            real = 0.0
            for batch in batches:
                batch = _to_device(batch, accelerator.device)
                with accelerator.accumulate(objective):
                    out = objective(**batch)
                    loss = out.lm_loss_sum * scale + coef * out.aux_loss
                    accelerator.backward(loss)
                lm_sum += out.lm_loss_sum.detach().double()
                aux_sum += out.aux_loss.detach().double()
                counts += out.expert_counts
                real += float(out.real_tokens)
            flag = 1.0 if stop.signum is not None else 0.0
            totals = accelerator.reduce(
                torch.stack(
                    [
                        lm_sum,
                        aux_sum,
                        torch.tensor(real, dtype=torch.float64, device=lm_sum.device),
                        torch.tensor(flag, dtype=torch.float64, device=lm_sum.device),
                    ]
                ),
                "sum",
            )
            counts = accelerator.reduce(counts, "sum")
            lm = totals[0].item() / max(n_trained, 1.0)
            aux = totals[1].item() / per_step
            where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            if not (math.isfinite(lm) and math.isfinite(aux)):
                raise TrainingDiverged(
                    f"step {step + 1}: the loss is not finite (lm {lm}, aux {aux}); stopped before applying the step; {where} "
                    f"(resume from it with a lower train.lr, e.g. resume=PATH train.lr={cfg_t.lr / 4:g})"
                )
            grad_norm = accelerator.clip_grad_norm_(
                trainable, cfg_t.max_grad_norm if cfg_t.max_grad_norm > 0 else float("inf")
            )
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if accelerator.distributed_type != DistributedType.DEEPSPEED and not math.isfinite(grad_norm):
                raise TrainingDiverged(
                    f"step {step + 1}: the gradient norm is {grad_norm}; stopped before applying the step; {where} "
                    f"(resume from it with a lower train.lr)"
                )
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            mb_consumed += per_step
            tokens_seen += int(totals[2].item())
            dt = time.time() - t0
            if main:
                stats = expert_load_stats(counts)
                rec = {
                    "step": step,
                    "loss": lm,
                    "aux_loss": aux,
                    "total_loss": lm + coef * aux,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "epoch": round(stream.epoch_at(mb_consumed), 4),
                    "tokens": int(totals[2].item()),
                    "trained_tokens": int(n_trained),
                    "tokens_per_s": totals[2].item() / max(dt, 1e-9),
                    "step_time_s": dt,
                    "router_entropy": stats["entropy"],
                    "router_max_min": stats["max_min"],
                    "router_idle": stats["idle"],
                }
                every = recipe.logging.expert_share_every_steps
                if every and step % every == 0:
                    rec["router_share"] = stats["share"]
                extra = {f"router/entropy_layer{i}": v for i, v in enumerate(stats["entropy"])}
                extra.update({f"router/max_min_layer{i}": v for i, v in enumerate(stats["max_min"]) if v is not None})
                tracker.train_step(rec, extra)
            if evaluating and recipe.eval.every_steps and step % recipe.eval.every_steps == 0:
                evaluate(step)
                last_eval_step = step
            if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0:
                save_checkpoint(step)
            if totals[3].item() > 0:
                stop_reason = "interrupted"
                break
            if evaluating and recipe.early_stopping.enabled and bad_evals >= recipe.early_stopping.patience:
                stop_reason = "early_stopping"
                if main:
                    delta = recipe.early_stopping.min_delta
                    gain = f"by more than min_delta {delta:g}" if delta else "at all"
                    tracker.info(
                        f"early stopping at step {step}: the validation loss has not improved {gain} for {bad_evals} "
                        f"evaluation(s); best {best_value:.4f} at step {best_step}"
                    )
                break
        if stop_reason != "interrupted":
            if evaluating and last_eval_step != step:
                evaluate(step)
                last_eval_step = step
            save_checkpoint(step, finished=True, stop_reason=stop_reason)
        else:
            save_checkpoint(step)
    finally:
        stop.restore()
        if main and tracker is not None:
            tracker.close(
                {"best_eval_loss": best_value, "best_step": best_step, "stop_reason": stop_reason, "step": step}
            )

    final_dir = None
    if stop_reason != "interrupted":
        # final/: the adapter at the end of training, written atomically like a checkpoint
        adapter_state = _gather_trainable(accelerator, unwrapped.model)
        if main:
            import shutil

            tmp = run_dir / f".tmp-{FINAL}"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_adapter(unwrapped.model, tmp, state=adapter_state, extra={"step": step})
            ck.fsync_tree(tmp)
            final_dir = run_dir / FINAL
            if final_dir.exists():
                shutil.rmtree(final_dir)
            tmp.rename(final_dir)
            fsync_path(run_dir)
        accelerator.wait_for_everyone()
        final_dir = run_dir / FINAL
    result = TrainResult(run_dir, step, stop_reason, best_step, best_value, evals, final_dir)
    if stop_reason == "interrupted":
        result.exit_code = 128 + (stop.signum or signal.SIGINT)
    if main:
        took = time.time() - t_start
        lines = [
            f"{'stopped early' if stop_reason == 'early_stopping' else 'interrupted' if stop_reason == 'interrupted' else 'finished'} "
            f"at step {step}/{total_steps} in {took:.0f}s; run directory {run_dir}"
        ]
        if best_step is not None:
            lines.append(
                f"  best: eval_loss {best_value:.4f} at step {best_step} -> {run_dir / CHECKPOINTS / step_dir_name(best_step)} (best.json)"
            )
        if final_dir is not None:
            lines.append(f"  final adapter: {final_dir}")
        if stop_reason == "interrupted":
            again = "run the same command again" if recipe.resume == "auto" else "run it again with resume=auto"
            lines.append(f"  checkpoint: {last_ckpt}; {again} to continue")
        lines.append(f"  metrics: {run_dir / METRICS}")
        print("\n".join(lines), flush=True)
    accelerator.end_training()
    return result


# ---- entry points ----------------------------------------------------------------------------------


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptoss_tune.train", description="Train a LoRA adapter on gpt-oss from a YAML recipe."
    )
    p.add_argument("recipe", help="recipe YAML (see docs/recipes.md)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="override recipe keys, e.g. train.lr=1e-4")
    return p


def run_cli(args) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    return train(recipe).exit_code


def main(argv: list[str] | None = None) -> int:
    """`python -m gptoss_tune.train` / `accelerate launch -m gptoss_tune.train`: user errors as one line."""
    args = build_arg_parser().parse_args(argv)
    try:
        return run_cli(args)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every process hits the same error; say it once
            print(f"gptoss_tune.train: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("gptoss_tune.train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
