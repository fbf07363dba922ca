"""The training loop: `accelerate launch -m gptoss_tune.train RECIPE.yaml [key=value ...]`.

Same as `gptoss-tune train RECIPE.yaml [key=value ...]` (one process). One optimizer step:

1. take the next P*G micro-batches of the stream (P processes, G = train.grad_accum; gptoss_tune.train.stream),
2. count the trained tokens N of the whole step over all processes (one small all-reduce),
3. for each micro-batch: LM loss sum * P*G/N + router.aux_loss_coef * load-balancing loss, backward
   (accelerate divides by G and DDP averages over P, so the step's gradient is exactly that of
   sum(token losses)/N + coef * mean(aux): every trained token weighs the same wherever it falls),
4. stop on a NaN/inf loss or gradient norm before the update, clip, AdamW, schedule; stop on non-finite or
   exploded parameters after it, before anything keeps them (gptoss_tune.train.divergence),
5. log, evaluate every eval.every_steps, checkpoint, early-stop; SIGINT/SIGTERM save and exit.

`train(recipe)` runs a Trainer: setup() (accelerator, output directory, data, schedule, model, optimizer,
distribution, resume, tracking), train() (the loop, one _train_step per optimizer step, evaluate,
save_checkpoint, the final adapter and the summary), cleanup(). What resume needs is one TrainerState
(gptoss_tune.train.state), written as each checkpoint's trainer_state.json.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.nn.parallel import DistributedDataParallel as DDP

from gptoss_tune.atomic_io import atomic_write_text, fsync_path
from gptoss_tune.data.batching import IGNORE_INDEX
from gptoss_tune.data.pipeline import format_report
from gptoss_tune.errors import Interrupted, UserError
from gptoss_tune.model.adapter import load_adapter_weights, read_adapter_config, save_adapter
from gptoss_tune.model.checkpoint import read_config, resolve_model_dir
from gptoss_tune.model.experts import MXFP4Experts
from gptoss_tune.model.loader import load_model
from gptoss_tune.runs import (
    CHECKPOINTS,
    DATA_REPORT,
    FINAL,
    METRICS,
    RECIPE,
    lock_run_dir,
    step_dir_name,
    truncate_metrics,
    wipe,
)
from gptoss_tune.train import checkpoint as ck  # a module: tests replace ck.write_checkpoint_files
from gptoss_tune.train import distributed as dist
from gptoss_tune.train import qat
from gptoss_tune.train.datafiles import check_data_files, record_data_files
from gptoss_tune.train.divergence import DivergenceGuard, TrainingDiverged
from gptoss_tune.train.length import run_length
from gptoss_tune.train.losses import expert_load_stats
from gptoss_tune.train.memory import apply_memory_settings, build_optimizer
from gptoss_tune.train.objective import Objective
from gptoss_tune.train.recipe import Recipe
from gptoss_tune.train.resume import check_output_dir
from gptoss_tune.train.schedule import apply_recipe_hyperparameters, lr_lambda
from gptoss_tune.train.state import TrainerState

# load_train_data is looked up here at each run: tests replace trainer.load_train_data with synthetic rows.
from gptoss_tune.train.stream import MicroBatchStream, TrainData, eval_batches, load_train_data
from gptoss_tune.train.tracking import Tracker


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
            raise Interrupted(signum)  # exits 128 + signum like the first signal (a second SIGTERM: 143, not 130)
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
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _gather_trainable(launch, module) -> dict | None:
    """Full trainable tensors for saving when parameters are sharded (FSDP2 DTensors, DeepSpeed ZeRO-3);
    every process must call this. None when parameters are whole (one process, DDP, ZeRO-2)."""
    if not launch.partitions_parameters:
        return None
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = {}
    if launch.strategy == "zero3":
        import deepspeed  # optional: installed only where DeepSpeed launches run

        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            for n, p in named:
                out[n] = p.detach().to("cpu", copy=True)
    else:
        for n, p in named:
            out[n] = dist.full_tensor(p).detach().to("cpu", copy=True)
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
    vocab = read_config(resolve_model_dir(recipe.model.path))["vocab_size"]
    for split, rows in (("train", data.train), ("validation", data.validation)):
        top = max((max(r["input_ids"]) for r in rows if r["input_ids"]), default=-1)
        if top >= vocab:
            raise UserError(
                f"{recipe.where('model', 'path')}: model.path: the {split} data holds token id {top}, but the model's "
                f"vocabulary has {vocab} tokens; gpt-oss needs the o200k_harmony vocabulary (201,088 tokens)"
            )


def _mode(launch, accelerator) -> str:
    mixed = f", {accelerator.mixed_precision} autocast" if accelerator.mixed_precision != "no" else ""
    return f" ({launch.name}{mixed})" if launch.strategy != "single" or mixed else ""


# ---- the run ---------------------------------------------------------------------------------------


def train(recipe: Recipe, data: TrainData | None = None) -> TrainResult:
    """Run a recipe (in every process of a launch). Returns what happened; raises UserError on bad input
    and TrainingDiverged on a NaN/inf loss."""
    trainer = Trainer(recipe, data)
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


class Trainer:
    """One run of a recipe, in every process of a launch. Only the main process writes files and prints.

    setup() prepares everything (and finds out whether a finished run has anything left to do), train()
    runs the loop to the end and returns a TrainResult, cleanup() releases the output directory's lock
    (call it in a finally). The live TrainerState is self.state; everything else the loop, evaluation
    and checkpoints share is an attribute set in setup()."""

    def __init__(self, recipe: Recipe, data: TrainData | None = None):
        self.recipe = recipe
        self.cfg = recipe.train
        self.data = data  # None: the recipe's data, through the data stage (load_train_data)
        self.run_dir = Path(recipe.output_dir)
        self.already_finished = False
        self.tracker: Tracker | None = None
        self._lock: int | None = None

    def _say(self, text: str) -> None:
        if self.is_main:
            print(text, flush=True)

    # ---- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything train() needs, in this order (each step's prints, files and RNG use come in the order
        they always did); stops after the schedule when a finished run has nothing left to do."""
        self._setup_accelerator()
        self.t_start = time.time()
        self._setup_output_dir()
        self._setup_data()
        self._setup_schedule()
        if self.already_finished:
            return
        self._setup_model()
        self._setup_optimizer()
        self._wrap_for_distribution()
        self._resume()
        self._setup_guard()
        self._setup_tracking()

    def _setup_accelerator(self) -> None:
        """The Accelerator of this launch; then the main process locks the output directory for the run."""
        # torch >= 2.12 renames DDP's broadcast_buffers; the MXFP4 buffers are excluded from DDP below either way.
        warnings.filterwarnings("ignore", message=".*broadcast_buffers. is deprecated", category=FutureWarning)
        cfg = self.cfg
        cuda = torch.cuda.is_available()
        mixed = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if cuda else "no")
        # The strategy is read from accelerate launch's environment and wrapped by us (train.distributed):
        # accelerate itself would run an FSDP config as DDP on CPU ranks, without a word.
        self.launch = dist.detect_launch()
        with dist.hidden_from_accelerate(self.launch):
            self.accelerator = acc = Accelerator(
                # Without a GPU, processes started by torchrun (`accelerate launch --multi_gpu`) talk over gloo.
                cpu=not cuda,
                mixed_precision=mixed,
                gradient_accumulation_steps=cfg.grad_accum,
                # MXFP4 experts are uint8 buffers (10 GB for 20b): never re-broadcast them every step.
                kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
            )
        self.num_processes, self.rank, self.is_main = acc.num_processes, acc.process_index, acc.is_main_process
        self.per_step = self.num_processes * cfg.grad_accum  # micro-batches per optimizer step, all processes
        self.sharded = self.launch.sharded  # per-rank optimizer state files
        if self.is_main:
            self._lock = lock_run_dir(self.run_dir, self.recipe.where("output_dir"))

    def _setup_output_dir(self) -> None:
        """Fresh, resume or refuse: every process decides from the same files, then only the main one writes."""
        self.plan = check_output_dir(self.recipe)
        data_files = check_data_files(self.recipe, self.plan, self.run_dir)  # a resumed run's data changed: refuse
        self.accelerator.wait_for_everyone()
        resuming = self.plan.mode == "resume"
        self.resumed = TrainerState.from_dict(ck.read_trainer_state(self.plan.checkpoint)) if resuming else None
        run_dir = self.run_dir
        if self.is_main:
            if self.plan.wipe and run_dir.exists():
                wipe(run_dir)
            (run_dir / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
            ck.clean_stale(run_dir)
            for damaged, why in self.plan.skipped:  # out of the way of pruning and of this run's new checkpoints
                moved = ck.set_aside(damaged)
                self._say(
                    f"note: resuming from {self.plan.checkpoint.name}: {damaged.name} is damaged ({why}); set aside as {moved}"
                )
            atomic_write_text(run_dir / RECIPE, self.recipe.to_yaml())
            record_data_files(run_dir, data_files)
            if self.resumed is not None:
                truncate_metrics(run_dir / METRICS, self.resumed.step)
            elif (run_dir / METRICS).exists():
                (run_dir / METRICS).unlink()
        self.accelerator.wait_for_everyone()

    def _setup_data(self) -> None:
        """Training and validation rows, their report, the micro-batch stream and this process's validation batches."""
        recipe, cfg = self.recipe, self.cfg
        if self.data is None:
            self.data = load_train_data(recipe)
        data = self.data
        if not data.train:
            raise UserError(
                f"{recipe.where('data', 'train')}: data.train: no training examples after rendering and filtering"
            )
        if self.is_main:
            atomic_write_text(self.run_dir / DATA_REPORT, json.dumps(data.report, indent=2, default=str) + "\n")
            if isinstance(data.report.get("train"), dict):
                self._say(format_report(data.report, listed=3) + f"\n  (data report: {self.run_dir / DATA_REPORT})")
        _check_token_ids(recipe, data)
        self.evaluating = bool(data.validation)
        self.early_stopping = recipe.early_stopping_on(len(data.validation))  # enabled: true without any: UserError
        if recipe.early_stopping.enabled == "auto" and not self.early_stopping:
            why = "the validation set is empty" if recipe.has_validation else "there is no validation data"
            self._say(
                f"early stopping: off, {why} (set data.validation or data.val_fraction to evaluate, keep the best "
                f"checkpoint and stop early)"
            )
        self.stream = MicroBatchStream(data.train, cfg.micro_batch_size, cfg.seed, recipe.data.packing)
        self.val_batches = []
        if self.evaluating:
            self.val_batches = eval_batches(
                data.validation,
                recipe.eval.micro_batch_size or cfg.micro_batch_size,
                recipe.data.packing,
                self.num_processes,
                self.rank,
                recipe.eval.max_batches,
            )

    def _setup_schedule(self) -> None:
        """Where this run starts and ends (in steps and in the data), its learning-rate schedule, and the
        live TrainerState. A resumed run keeps its data position and warmup; its length is this recipe's."""
        cfg, resumed = self.cfg, self.resumed
        start_step = resumed.step if resumed is not None else 0
        mb_consumed = 0
        if resumed is not None:
            # the position is counted in the micro-batches of the run that wrote it (its micro_batch_size)
            mbs = resumed.micro_batch_size if resumed.micro_batch_size is not None else cfg.micro_batch_size
            mb_consumed = self.stream.position_from(resumed.micro_batches_consumed, mbs)
        total_steps, self.length_why = run_length(
            cfg.epochs, cfg.max_steps, self.stream.per_epoch, self.per_step, start_step, mb_consumed
        )
        self.start_step = start_step
        self.total_steps = total_steps
        warmup = math.ceil(cfg.warmup_ratio * total_steps) if resumed is None else resumed.warmup_steps
        self.schedule = lr_lambda(total_steps, warmup, cfg.scheduler, cfg.min_lr_ratio)
        self.state = TrainerState(
            step=start_step,
            micro_batches_consumed=mb_consumed,
            num_processes=self.num_processes,
            grad_accum=cfg.grad_accum,
            micro_batch_size=cfg.micro_batch_size,
            total_steps=total_steps,
            warmup_steps=warmup,
            fingerprint=self.recipe.fingerprint_hash(),
        )
        self.already_finished = self._finished_before()

    def _finished_before(self) -> bool:
        """A resumed run that finished has nothing to do unless the recipe now asks for more steps (or, after
        early stopping, more patience): say so."""
        resumed, plan, es = self.resumed, self.plan, self.recipe.early_stopping
        if resumed is None or not resumed.finished:
            return False
        stopped_early = (
            resumed.stop_reason == "early_stopping"
            and self.early_stopping
            and not plan.branch
            and resumed.evals_without_improvement >= es.patience
        )
        if not (stopped_early or self.total_steps <= self.start_step):
            return False
        self._say(
            f"{plan.checkpoint if plan.branch else self.run_dir}: this run already finished at step {self.start_step} ({resumed.stop_reason}); nothing to do. "
            f"Raise train.max_steps / train.epochs (or early_stopping.patience) to continue it, "
            f"or pass resume=never overwrite=true to start over."
        )
        return True

    def _setup_model(self) -> None:
        """The model with LoRA attached: identical initialisation on every process (per-process RNG streams
        start in _resume), the experts' backend checked here, the adapter of the checkpoint resumed from."""
        recipe = self.recipe
        set_seed(self.cfg.seed)
        dtype = None if recipe.model.dtype == "auto" else recipe.model.dtype
        acc = self.accelerator
        device = acc.device if acc.device.type != "cpu" else torch.device("cpu")  # multi-CPU says cpu:0
        self.model = model = load_model(
            recipe.model.path,
            lora=recipe.lora,
            device=device,
            dtype=dtype,
            attn_implementation=recipe.model.attn_implementation,
        )
        backends = set()
        for m in model.modules():
            if isinstance(m, MXFP4Experts):
                m.backend = recipe.model.experts_backend
                # a backend that cannot run here is a one-line error now, not at the first step
                backends.add(m.resolved_backend(device))
        self.runs_on = (
            f"on {device} in {str(next(model.parameters()).dtype).replace('torch.', '')}; experts: "
            f"{'/'.join(sorted(backends)) or 'none'}; attention: {model.config._attn_implementation}"
        )
        if recipe.router.train:
            _train_routers(model)
        if recipe.model.shard_experts:
            dist.hold_experts_as_parameters(model)  # frozen uint8 parameters: FSDP2 / ZeRO-3 shard them
        if self.resumed is not None:
            self._load_checkpoint_adapter()

    def _load_checkpoint_adapter(self) -> None:
        """The trainable weights of the checkpoint resumed from, after checking it fits this recipe and launch."""
        resumed, ckpt = self.resumed, self.plan.checkpoint
        if self.sharded and resumed.num_processes != self.num_processes:
            raise UserError(
                f"{ckpt}: written by {resumed.num_processes} processes with sharded optimizer state; "
                f"resume it with --num_processes {resumed.num_processes}"
            )
        written_by = dist.read_checkpoint_strategy(ckpt)
        if written_by is not None and written_by != self.launch.strategy:
            raise UserError(
                f"{ckpt}: written under {dist.STRATEGY_NAMES.get(written_by, written_by)}, this launch runs "
                f"{self.launch.name}; their optimizer states differ: resume it with the accelerate config it was "
                f"written with (or start a new run from its adapter)"
            )
        lora = self.recipe.lora.to_dict()
        meta = read_adapter_config(ckpt)
        if meta.get("lora") != lora:
            raise UserError(f"{ckpt}: trained with lora {meta.get('lora')}, the recipe says {lora}")
        load_adapter_weights(self.model, ckpt)

    def _setup_optimizer(self) -> None:
        """Memory settings (checkpointing, offload), the training objective and the optimizer, unwrapped."""
        cfg, model = self.cfg, self.model
        # Checkpointing (non-reentrant, per decoder layer, optional host offload) and the optimizer come from
        # gptoss_tune.train.memory, the same code path scripts/bench_train.py measures.
        self.memory = apply_memory_settings(model, cfg.memory_settings())
        model.config.use_cache = False
        model.train()
        self.objective = Objective(model, chunk_tokens=cfg.loss_chunk_tokens)
        self.optimizer = self._build_optimizer()

    def _build_optimizer(self):
        cfg = self.cfg
        return build_optimizer(
            [p for p in self.objective.parameters() if p.requires_grad],
            self.memory.optimizer,
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
        )

    def _wrap_for_distribution(self) -> None:
        """Wrap for this launch's strategy (train.distributed) and create the LR scheduler, stepped by us once
        per optimizer step under every strategy: every distribution-specific branch of the setup is here."""
        acc, objective, optimizer, strategy = self.accelerator, self.objective, self.optimizer, self.launch.strategy
        self.engine = None  # the DeepSpeed engine, which owns backward and the update
        self.prepared = strategy in ("single", "ddp")  # accelerate wraps (and autocasts) the model
        if strategy == "ddp":
            # Frozen weights and MXFP4 buffers are identical on every process (same checkpoint): skip their
            # broadcast when DDP wraps the model (10 GB for 20b).
            frozen = [n for n, p in objective.named_parameters() if not p.requires_grad] + [
                n for n, _ in objective.named_buffers()
            ]
            DDP._set_params_and_buffers_to_ignore_for_model(objective, frozen)
        if strategy == "fsdp2":
            dist.shard_fsdp2(objective, self.model, acc.device)
            optimizer = self._build_optimizer()  # over the sharded (DTensor) parameters fully_shard put in place
            base = optimizer
            self.ckpt_optimizer = dist.LocalOptimizerState(optimizer)
        elif self.launch.deepspeed_engine:
            deepspeed = dist.import_deepspeed(cpu=acc.device.type == "cpu")
            config = dist.deepspeed_config(self.launch, self.cfg, self.num_processes)
            self.engine = dist.init_deepspeed(deepspeed, objective, self.model, optimizer, config)
            base = dist.deepspeed_base_optimizer(self.engine)
            self.ckpt_optimizer = dist.DeepSpeedOptimizerState(self.engine)
            objective = self.engine
        else:
            objective, optimizer = acc.prepare(objective, optimizer)
            base = self.ckpt_optimizer = getattr(optimizer, "optimizer", optimizer)
        # Stepped here once per optimizer step (accelerate's wrapper would step it once per process).
        scheduler = torch.optim.lr_scheduler.LambdaLR(base, self.schedule)
        self.objective, self.optimizer, self.scheduler = objective, optimizer, scheduler
        self.base_optimizer = base
        self.unwrapped = self.engine.module if self.engine is not None else acc.unwrap_model(objective)
        self.trainable = [p for p in self.unwrapped.parameters() if p.requires_grad]  # FSDP2: DTensors

    def _resume(self) -> None:
        """From the checkpoint: optimizer and scheduler state under this recipe's hyperparameters, the best
        checkpoint and early stopping (not when branching into a new run), token count and RNG streams."""
        resumed, plan, state = self.resumed, self.plan, self.state
        # The checkpoint resumed from is this run's (nothing to write again at its step) unless it lies elsewhere.
        self.saved_steps: set[int] = {self.start_step} if resumed is not None and not plan.branch else set()
        self.last_ckpt: Path | None = plan.checkpoint if resumed is not None else None
        self.last_eval_step: int | None = None
        if resumed is None:
            set_seed(self.cfg.seed + self.rank)  # dropout differs between processes, as data does
            return
        device = self.accelerator.device
        # torch rejects map_location "cpu:0", the device of every multi-process CPU rank
        ck.load_optimizer_state(
            plan.checkpoint, self.ckpt_optimizer, self.rank, self.sharded, "cpu" if device.type == "cpu" else device
        )
        ck.load_scheduler_state(plan.checkpoint, self.scheduler)
        apply_recipe_hyperparameters(self.base_optimizer, self.scheduler, self.schedule, self.cfg)
        if plan.branch:
            # A new run from another run's checkpoint: its best checkpoint is not in this directory, and its
            # validation data may differ; the best adapter and early stopping start afresh here.
            self._say(
                f"note: starting a new run in {self.run_dir} from {plan.checkpoint} (step {self.start_step}): the best checkpoint "
                f"and early stopping start afresh"
            )
        else:
            state.best_step, state.best_value = resumed.best_step, resumed.best_value
            state.evals_without_improvement = resumed.evals_without_improvement
            state.evals = resumed.evals
        state.tokens_seen = resumed.tokens_seen
        if not ck.load_rng_state(plan.checkpoint, self.rank) or resumed.num_processes != self.num_processes:
            set_seed(self.cfg.seed + 1000 * self.start_step + self.rank)
            self._say(
                f"note: the checkpoint was written by {resumed.num_processes} process(es), this run has {self.num_processes}: "
                f"data position is kept, random streams (dropout) restart"
            )
        if state.evals and state.evals[-1]["step"] == self.start_step:
            self.last_eval_step = self.start_step  # evaluated at the checkpoint's step: not again at the end

    def _setup_guard(self) -> None:
        """The divergence guard (gptoss_tune.train.divergence) over the trainable parameters as they start."""
        acc = self.accelerator
        # summed over the ranks where each holds a part of every parameter
        reduce = (lambda t: acc.reduce(t.to(acc.device), "sum")) if self.launch.partitions_parameters else None
        self.guard = DivergenceGuard(self.recipe, self.run_dir, self.trainable, reduce, self.num_processes)
        if self.resumed is not None and not math.isfinite(self.guard.start_norm):
            raise TrainingDiverged(
                f"{self.plan.checkpoint}: this checkpoint holds non-finite trainable parameters (written before they "
                f"were checked); resume from an earlier checkpoint with resume=PATH, or start again with resume=never"
            )

    def _setup_tracking(self) -> None:
        """metrics.jsonl / W&B (main process), and the one line that says what this run trains, how and where."""
        recipe, cfg, data = self.recipe, self.cfg, self.data
        if self.is_main:
            self.tracker = Tracker(recipe, self.run_dir, self.total_steps, self.start_step)
        n_params = dist.trainable_numel(self.trainable)  # ZeRO-3 leaves numel() 0 on partitioned parameters
        self._say(
            f"training {recipe.model.path} with LoRA r={recipe.lora.rank} on {', '.join(recipe.lora.attention + recipe.lora.experts) or 'nothing'}"
            f"{' + router' if recipe.router.train else ''}: {n_params:,} trainable parameters; {len(data.train)} train rows, "
            f"{len(data.validation)} validation rows; {self.num_processes} process(es){_mode(self.launch, self.accelerator)} x {cfg.grad_accum} accumulation x {cfg.micro_batch_size} rows per step; "
            + (
                f"steps {self.start_step}->{self.total_steps} of {self.length_why} (resumed from {self.plan.checkpoint})"
                if self.resumed is not None
                else self.length_why
            )
            + f"; {self.runs_on}; {dist.resident_summary(self.unwrapped)}; writing to {self.run_dir}"
        )

    # ---- the loop ----------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Train to the end (or early stop, or a signal), save the final adapter, print the summary."""
        if self.already_finished:
            return TrainResult(self.run_dir, self.start_step, "already_finished")
        self.stop = StopSignal().install()
        self.stop_reason = "completed"
        state = self.state
        try:
            self._loop()
        finally:
            self.stop.restore()
            if self.tracker is not None:
                self.tracker.close(
                    {
                        "best_eval_loss": state.best_value,
                        "best_step": state.best_step,
                        "stop_reason": self.stop_reason,
                        "step": state.step,
                    }
                )
        final_dir = self._save_final_adapter() if self.stop_reason != "interrupted" else None
        result = TrainResult(
            self.run_dir, state.step, self.stop_reason, state.best_step, state.best_value, state.evals, final_dir
        )
        if self.stop_reason == "interrupted":
            result.exit_code = 128 + (self.stop.signum or signal.SIGINT)
        if self.is_main:
            self._print_summary(final_dir)
        self.accelerator.end_training()
        return result

    def _loop(self) -> None:
        """Evaluate the untrained adapter if asked; steps, each followed by its evaluation, checkpoint and stop
        checks; at the end a last evaluation and the finished checkpoint (a plain one when interrupted)."""
        recipe, state = self.recipe, self.state
        if self.evaluating and recipe.eval.at_start and self.resumed is None:
            self.evaluate(0)  # the untrained adapter (B = 0): the base model's loss
        while state.step < self.total_steps:
            interrupted = self._train_step()
            step = state.step
            if self.evaluating and recipe.eval.every_steps and step % recipe.eval.every_steps == 0:
                self.evaluate(step)
            if recipe.checkpoint.every_steps and step % recipe.checkpoint.every_steps == 0:
                self.save_checkpoint(step)
            if interrupted:
                self.stop_reason = "interrupted"
                break
            if self._early_stop():
                self.stop_reason = "early_stopping"
                break
        if self.stop_reason != "interrupted":
            if self.evaluating and self.last_eval_step != state.step:
                self.evaluate(state.step)
            self.save_checkpoint(state.step, finished=True, stop_reason=self.stop_reason)
        else:
            self.save_checkpoint(state.step)

    def _early_stop(self) -> bool:
        """Whether the validation loss stopped improving for early_stopping.patience evaluations (and say so)."""
        es, state = self.recipe.early_stopping, self.state
        if not (self.evaluating and self.early_stopping and state.evals_without_improvement >= es.patience):
            return False
        if self.is_main:
            gain = f"by more than min_delta {es.min_delta:g}" if es.min_delta else "at all"
            self.tracker.info(
                f"early stopping at step {state.step}: the validation loss has not improved {gain} for {state.evals_without_improvement} "
                f"evaluation(s); best {state.best_value:.4f} at step {state.best_step}"
            )
        return True

    def _train_step(self) -> bool:
        """One optimizer step over the next P*G micro-batches of the stream; True when a stop signal reached
        any process during it (the loop then saves and stops)."""
        t0 = time.time()
        qat.before_step(self)  # the quantisation-aware finishing phase, when it begins (train/qat.py)
        acc, state, stream = self.accelerator, self.state, self.stream
        indices = stream.step_indices(state.micro_batches_consumed, self.num_processes, self.cfg.grad_accum, self.rank)
        batches = [stream.batch(i) for i in indices]
        local = torch.tensor([float(sum(_trained_in(b) for b in batches))], device=acc.device)
        n_trained = acc.reduce(local, "sum").item()
        lm_sum, aux_sum, real, counts = self._forward_backward(batches, scale=self.per_step / max(n_trained, 1.0))
        flag = 1.0 if self.stop.signum is not None else 0.0
        totals = acc.reduce(
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
        counts = acc.reduce(counts, "sum")
        lm = totals[0].item() / max(n_trained, 1.0)
        aux = totals[1].item() / self.per_step
        lr, grad_norm = self._optimizer_step(lm, aux)
        state.step += 1
        state.micro_batches_consumed += self.per_step
        state.tokens_seen += int(totals[2].item())
        dt = time.time() - t0
        if self.is_main:
            record = {
                "step": state.step,
                "loss": lm,
                "aux_loss": aux,
                "total_loss": lm + self.recipe.router.aux_loss_coef * aux,
                "lr": lr,
                "grad_norm": grad_norm,
                "epoch": round(stream.epoch_at(state.micro_batches_consumed), 4),
                "tokens": int(totals[2].item()),
                "trained_tokens": int(n_trained),
                "tokens_per_s": totals[2].item() / max(dt, 1e-9),
                "step_time_s": dt,
            }
            self._log_step(record, counts)
        return totals[3].item() > 0

    def _forward_backward(self, batches: list[dict], scale: float):
        """Forward and backward of this process's micro-batches (accelerate accumulates the gradients);
        returns this process's LM loss sum, aux loss sum, real tokens and expert counts."""
        acc = self.accelerator
        coef = self.recipe.router.aux_loss_coef
        lm_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        aux_sum = torch.zeros((), device=acc.device, dtype=torch.float64)
        counts = torch.zeros(self.model.config.num_hidden_layers, self.unwrapped.num_experts, device=acc.device)
        real = 0.0
        # accelerate autocasts the models it prepared (one process, DDP); FSDP2 and DeepSpeed are ours.
        autocast = contextlib.nullcontext if self.prepared else acc.autocast
        for i, batch in enumerate(batches):
            batch = _to_device(batch, acc.device)
            if self.engine is not None:
                with autocast():
                    out = self.objective(**batch)
                    loss = out.lm_loss_sum * scale + coef * out.aux_loss
                self.engine.backward(loss)  # divides by grad_accum itself
                if i < len(batches) - 1:
                    self.engine.step()  # inside the accumulation: DeepSpeed only counts the micro-batch
            else:
                with acc.accumulate(self.objective), autocast():
                    out = self.objective(**batch)
                    loss = out.lm_loss_sum * scale + coef * out.aux_loss
                    acc.backward(loss)
            lm_sum += out.lm_loss_sum.detach().double()
            aux_sum += out.aux_loss.detach().double()
            counts += out.expert_counts
            real += float(out.real_tokens)
        return lm_sum, aux_sum, real, counts

    def _optimizer_step(self, lm: float, aux: float) -> tuple[float, float]:
        """Stop on a NaN/inf loss or gradient norm before the update; else clip, step the optimizer and the
        schedule. Returns the learning rate this step used and the gradient norm before clipping."""
        acc, cfg, step, guard = self.accelerator, self.cfg, self.state.step, self.guard
        if not (math.isfinite(lm) and math.isfinite(aux)):
            what = f"the loss is not finite (lm {lm}, aux {aux}); stopped before applying the step"
            raise guard.diverged(step + 1, what, self.last_ckpt)
        if self.engine is not None:
            # DeepSpeed clips (gradient_clipping = train.max_grad_norm) inside engine.step(), which applies the
            # update: the norm is checked here first, from the reduced gradients every rank assembles.
            grad_norm = dist.deepspeed_grad_norm(self.trainable)
        else:
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            grad_norm = acc.clip_grad_norm_(self.trainable, max_norm)
            grad_norm = float(dist.full_tensor(grad_norm)) if grad_norm is not None else float("nan")
        if not math.isfinite(grad_norm):
            what = f"the gradient norm is {grad_norm}; stopped before applying the step"
            raise guard.diverged(step + 1, what, self.last_ckpt)
        lr = self.scheduler.get_last_lr()[0]
        if self.engine is not None:
            self.engine.step()  # the accumulation boundary: clip, AdamW, zero the gradients
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        guard.after_update(step + 1, self.last_ckpt)  # non-finite or exploded parameters: stop, keep nothing
        vanished = guard.grad_norm(step + 1, grad_norm)
        if vanished and self.is_main:
            self.tracker.info(vanished)
        return lr, grad_norm

    def _log_step(self, record: dict, counts: torch.Tensor) -> None:
        """Main process: the step's line of metrics.jsonl with the router's load statistics, and W&B."""
        stats = expert_load_stats(counts)
        record.update(router_entropy=stats["entropy"], router_max_min=stats["max_min"], router_idle=stats["idle"])
        every = self.recipe.logging.expert_share_every_steps
        if every and record["step"] % every == 0:
            record["router_share"] = stats["share"]
        extra = {f"router/entropy_layer{i}": v for i, v in enumerate(stats["entropy"])}
        extra.update({f"router/max_min_layer{i}": v for i, v in enumerate(stats["max_min"]) if v is not None})
        self.tracker.train_step(record, extra)

    # ---- evaluation and checkpoints ----------------------------------------------------------------

    def evaluate(self, step: int) -> dict:
        """Validation loss, perplexity and accuracy over all processes; keeps the best adapter (a checkpoint
        at this step when it improved) and early stopping's patience count."""
        state, es = self.state, self.recipe.early_stopping
        sums = self._validation_sums()
        n = max(sums[1].item(), 1.0)
        loss = sums[0].item() / n
        # The best adapter is the lowest validation loss, however small the gain; min_delta only decides
        # whether an evaluation resets the patience count (as transformers' EarlyStoppingCallback does).
        improved_enough = state.best_value is None or loss < state.best_value - es.min_delta
        improved = state.best_value is None or loss < state.best_value
        if improved:
            state.best_step, state.best_value = step, loss
        state.evals_without_improvement = 0 if improved_enough else state.evals_without_improvement + 1
        rec = {
            "step": step,
            "eval_loss": loss,
            "eval_perplexity": math.exp(min(loss, 700.0)),
            "eval_accuracy": sums[2].item() / n,
            "eval_tokens": int(sums[1].item()),
            "best_eval_loss": state.best_value,
            "best_step": state.best_step,
            "evals_without_improvement": state.evals_without_improvement,
        }
        state.evals.append({"step": step, "eval_loss": loss})
        self.last_eval_step = step
        if self.is_main:
            self.tracker.eval_step(rec)
        if improved:
            self.save_checkpoint(step)  # the best adapter is always a checkpoint (best.json points to it)
        return rec

    def _validation_sums(self) -> torch.Tensor:
        """[LM loss sum, trained tokens, correct predictions, aux loss] over the validation set, all processes."""
        acc = self.accelerator
        self.model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=acc.device)
        with torch.no_grad(), acc.autocast():
            for batch, weight in self.val_batches:
                out = self.unwrapped(**_to_device(batch, acc.device), evaluate=True)
                if weight:
                    sums += torch.stack(
                        [
                            out.lm_loss_sum.double(),
                            out.trained_tokens.double(),
                            out.correct.double(),
                            out.aux_loss.double(),
                        ]
                    )
        self.model.train()
        return acc.reduce(sums, "sum")

    def _state_to_write(self, step: int, finished: bool, stop_reason: str | None) -> dict:
        epoch = round(self.stream.epoch_at(self.state.micro_batches_consumed), 6)
        return replace(self.state, step=step, epoch=epoch, finished=finished, stop_reason=stop_reason).to_dict()

    def save_checkpoint(self, step: int, finished: bool = False, stop_reason: str | None = None) -> Path:
        """checkpoints/step-N (every process takes part), then best.json and pruning. At a step already
        saved only the bookkeeping is rewritten."""
        acc, run_dir, is_main, best = self.accelerator, self.run_dir, self.is_main, self.state.best_step
        path = run_dir / CHECKPOINTS / step_dir_name(step)
        if step in self.saved_steps:
            # Same weights, optimizer and RNG; the bookkeeping may have changed since (an evaluation at this
            # step made it the best, the run finished here): write that, and best.json.
            if is_main:
                ck.rewrite_trainer_state(path, self._state_to_write(step, finished, stop_reason))
                if best is not None:
                    ck.write_best(run_dir, best, self.state.best_value)
            acc.wait_for_everyone()
            return path
        problem = self.guard.unsound()  # every process decides the same (the norm is global)
        if problem is not None:
            raise self.guard.diverged(step, f"{problem}; not written as a checkpoint", self.last_ckpt)
        if is_main:
            ck.prepare_tmp(run_dir, step)
        acc.wait_for_everyone()
        adapter_state = _gather_trainable(self.launch, self.unwrapped.model)
        ck.write_checkpoint_files(
            ck.tmp_dir_for(run_dir, step),
            rank=self.rank,
            is_main=is_main,
            sharded=self.sharded,
            model=self.unwrapped.model,
            optimizer=self.ckpt_optimizer,
            scheduler=self.scheduler,
            trainer_state=self._state_to_write(step, finished, stop_reason),
            adapter_state=adapter_state,
        )
        if is_main:
            dist.write_checkpoint_strategy(ck.tmp_dir_for(run_dir, step), self.launch)
        acc.wait_for_everyone()
        if is_main:
            ck.commit(run_dir, step)
            if best is not None:
                ck.write_best(run_dir, best, self.state.best_value)
            ck.prune(run_dir, self.recipe.checkpoint.keep, best)
        acc.wait_for_everyone()
        self.saved_steps.add(step)
        self.last_ckpt = path
        return path

    # ---- the end -----------------------------------------------------------------------------------

    def _save_final_adapter(self) -> Path:
        """final/: the adapter at the end of training, written atomically like a checkpoint."""
        run_dir = self.run_dir
        adapter_state = _gather_trainable(self.launch, self.unwrapped.model)
        if self.is_main:
            tmp = run_dir / f".tmp-{FINAL}"
            if tmp.exists():
                shutil.rmtree(tmp)
            with ck.write_guard(
                tmp, run_dir / FINAL, lambda: ck.state_bytes(adapter_state or self.trainable), self.last_ckpt
            ):
                save_adapter(self.unwrapped.model, tmp, state=adapter_state, extra={"step": self.state.step})
                ck.fsync_tree(tmp)
                ck.write_manifest(tmp)  # export verifies final/ like a checkpoint
            final_dir = run_dir / FINAL
            if final_dir.exists():
                shutil.rmtree(final_dir)
            tmp.rename(final_dir)
            fsync_path(run_dir)
        self.accelerator.wait_for_everyone()
        return run_dir / FINAL

    def _print_summary(self, final_dir: Path | None) -> None:
        run_dir, state, reason = self.run_dir, self.state, self.stop_reason
        took = time.time() - self.t_start
        lines = [
            f"{'stopped early' if reason == 'early_stopping' else 'interrupted' if reason == 'interrupted' else 'finished'} "
            f"at step {state.step}/{self.total_steps} in {took:.0f}s; run directory {run_dir}"
        ]
        if state.best_step is not None:
            lines.append(
                f"  best: eval_loss {state.best_value:.4f} at step {state.best_step} -> {run_dir / CHECKPOINTS / step_dir_name(state.best_step)} (best.json)"
            )
        if final_dir is not None:
            lines.append(f"  final adapter: {final_dir}")
        if reason == "interrupted":
            again = "run the same command again" if self.recipe.resume == "auto" else "run it again with resume=auto"
            lines.append(f"  checkpoint: {self.last_ckpt}; {again} to continue")
        lines.append(f"  metrics: {run_dir / METRICS}")
        if self.guard.vanished:
            lines.append(f"  {self.guard.vanished}")
        print("\n".join(lines), flush=True)

    def cleanup(self) -> None:
        """Release the output directory's lock (held by the main process from setup on)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
