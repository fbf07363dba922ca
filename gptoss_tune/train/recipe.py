"""Training recipes: a YAML file validated by a pydantic schema, with `key.sub=value` overrides.

Every key has a default and a description (docs/recipes.md documents them with the reasons). Unknown
keys are refused with a did-you-mean; wrong types and out-of-range values are one-line errors naming the
key path and the file. YAML is read with RecipeLoader: a key repeated in one mapping is an error, and
`1e-3` is a number (types are strict, see gptoss_tune/settings.py). Paths written in the recipe are resolved relative to the recipe file; paths given
as command-line overrides are resolved relative to the current directory (where the user typed them).

    recipe = load_recipe("recipes/tiny-demo.yaml", ["train.lr=1e-3", "train.max_steps=20"])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from gptoss_tune.data.harmony import parse_tools
from gptoss_tune.data.settings import DataSettings
from gptoss_tune.errors import CheckpointError, UserError
from gptoss_tune.model.adapter import CONFIG_FILE as ADAPTER_CONFIG
from gptoss_tune.model.attention import ROUTES
from gptoss_tune.model.checkpoint import _HUB_ID
from gptoss_tune.model.loader import check_checkpoint  # torch and transformers: only when paths are checked
from gptoss_tune.model.lora import LoraSettings
from gptoss_tune.settings import Settings, did_you_mean, first_error, section_class
from gptoss_tune.train.checkpoint import TRAINER_STATE
from gptoss_tune.train.memory import MemorySettings


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first_line: int, line: int):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first_line, self.line = key, first_line, line


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with two changes for recipes and overrides.

    A key written twice in one mapping is an error (YAML keeps the last one silently: a second `lora:`
    section replaced the whole first one). And a number in exponent form without a dot (`1e-3`,
    `2E+5`) is a float, as in YAML 1.2; PyYAML's YAML 1.1 rules read it as a string, which the strict
    settings would refuse. Everything else is as safe_load reads it (`yes`/`no` stay booleans).
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # `<<: *base` merges are meant to be overridden
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(key, first[key], line)
                first[key] = line
        return super().construct_mapping(node, deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def load_yaml(text: str):
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader subclass)


class ModelSection(Settings):
    path: str = Field(
        description="gpt-oss checkpoint directory (config.json + *.safetensors, MXFP4 or bf16 experts), or a hub id already in the local Hugging Face cache"
    )
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="dtype of the non-expert weights and activations: auto = bf16 on GPU, fp32 on CPU"
    )
    attn_implementation: str | None = Field(
        None,
        description="attention implementation; null = gptoss_sink (sinks, sliding window, packed examples kept apart; flex attention on GPU)",
    )
    experts_backend: Literal["auto", "reference", "triton"] = Field(
        "auto",
        description="MXFP4 expert compute: auto = Triton kernels on GPU when available, else the torch reference",
    )
    shard_experts: bool = Field(
        False,
        description="hold the MXFP4 expert blocks and scales as frozen uint8 parameters, so FSDP2 and DeepSpeed ZeRO-3 shard them over the ranks (120b: 60.9 GB of experts / ranks each) instead of a whole copy per rank; no effect on one process or DDP (see docs/recipes.md)",
    )


class RouterSection(Settings):
    aux_loss_coef: float = Field(
        0.01,
        ge=0,
        description="weight of the expert load-balancing loss added to the LM loss (0 = off; see docs/recipes.md for why 0.01)",
    )
    train: bool = Field(
        False, description="train the router (weight and bias of every layer, saved in the adapter); frozen otherwise"
    )


class TrainSection(MemorySettings):
    """`train:`: the run's length, batch, optimizer and schedule, and the memory knobs of MemorySettings."""

    epochs: float | None = Field(
        None,
        gt=0,
        description="passes over the training data (fractions allowed), used only when train.max_steps is unset; null = 1",
    )
    max_steps: int | None = Field(
        None,
        ge=1,
        description="run exactly this many optimizer steps, cycling the data (reshuffled every epoch) as often as needed; overrides train.epochs",
    )
    micro_batch_size: int = Field(1, ge=1, description="rows per forward pass per process")
    grad_accum: int = Field(8, ge=1, description="micro-batches per optimizer step per process")
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after warmup")
    warmup_ratio: float = Field(
        0.03, ge=0, lt=1, description="fraction of the steps spent warming the learning rate up linearly from 0"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine/linear decay ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay on the trainable parameters")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the global gradient norm to this (0 = no clipping)")
    seed: int = Field(42, description="seed for LoRA initialisation, data order, dropout")
    mixed_precision: Literal["auto", "bf16", "no"] = Field(
        "auto", description="auto = bf16 autocast on GPU, none on CPU"
    )


class EvalSection(Settings):
    every_steps: int = Field(
        100, ge=0, description="evaluate every N optimizer steps (0 = only at the end); always also at the end"
    )
    at_start: bool = Field(
        False, description="also evaluate before the first step (the base model's validation loss, a baseline)"
    )
    micro_batch_size: int | None = Field(
        None, ge=1, description="rows per evaluation forward pass; null = train.micro_batch_size"
    )
    max_batches: int | None = Field(
        None, ge=1, description="evaluate on at most this many micro-batches (null = the whole validation set)"
    )


class EarlyStoppingSection(Settings):
    enabled: bool | Literal["auto"] = Field(
        "auto",
        description="stop when the validation loss has not improved for `patience` evaluations; auto = on when there is validation data, off (saying so) when there is none",
    )
    patience: int = Field(
        3, ge=0, description="evaluations without improvement before stopping (at least 1 when early stopping is on)"
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="an evaluation resets the patience count only if it lowers the best validation loss by more than this (the best adapter is always the lowest loss)",
    )


class CheckpointSection(Settings):
    every_steps: int = Field(
        100,
        ge=0,
        description="write a checkpoint every N optimizer steps (0 = only the best, on interruption and at the end)",
    )
    keep: int = Field(2, ge=1, description="keep the newest N checkpoints, plus the best one")


class WandbSection(Settings):
    project: str = Field("gptoss-tune", min_length=1, description="Weights & Biases project")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description="offline writes to output_dir/wandb (sync later with `wandb sync`), online needs `wandb login`",
    )
    entity: str | None = Field(None, description="W&B entity (team or user); null = your default")
    name: str | None = Field(None, description="run name; null = the output directory's name")
    tags: list[str] = Field(default_factory=list, description="run tags")


class LoggingSection(Settings):
    every_steps: int = Field(
        1,
        ge=1,
        description="print a progress line / update the bar and W&B every N steps (metrics.jsonl gets every step)",
    )
    progress: Literal["auto", "bar", "lines", "none"] = Field(
        "auto", description="auto = a progress bar on a terminal, plain lines otherwise"
    )
    expert_share_every_steps: int = Field(
        10, ge=0, description="add every layer's per-expert token share to metrics.jsonl every N steps (0 = never)"
    )
    wandb: WandbSection = Field(default_factory=WandbSection, description="Weights & Biases tracking")


class QuantizationAwareSection(Settings):
    """`quantization_aware:`: finish training on the weights the merged-mxfp4 export will hold (train/qat.py)."""

    steps: int = Field(
        0,
        ge=0,
        description="run the last N optimizer steps through the fake-quantised merged expert weight Q(W + s·B·A) "
        "with a straight-through gradient, so the merged-mxfp4 export equals the trained model (0 = off)",
    )
    requant: Literal["keep", "mse", "openai"] = Field(
        "keep",
        description="the re-quantiser Q of the phase (and, by default, of the export): keep = nearest on the base's "
        "MXFP4 grid, mse = per block the best of exponents s-1/s/s+1, openai = OpenAI's amax rule",
    )


class Recipe(Settings):
    model: ModelSection
    lora: LoraSettings = Field(default_factory=LoraSettings)
    router: RouterSection = Field(default_factory=RouterSection)
    data: DataSettings
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    early_stopping: EarlyStoppingSection = Field(default_factory=EarlyStoppingSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    logging: LoggingSection = Field(default_factory=LoggingSection)
    quantization_aware: QuantizationAwareSection = Field(default_factory=QuantizationAwareSection)
    resume: str = Field(
        "auto",
        min_length=1,
        description="auto = continue from the newest checkpoint in output_dir if there is one; never = start fresh; or a checkpoint directory",
    )
    output_dir: str | None = Field(
        None, description="run directory; null = runs/<recipe file name> under the current directory"
    )
    overwrite: bool = Field(
        False, description="allow starting fresh in an output_dir that holds another run (its contents are deleted)"
    )
    resume_allow_data_change: bool = Field(
        False,
        description="resume a run although a data file changed under the same path since it started (refused otherwise)",
    )

    @model_validator(mode="after")
    def _validation_for_early_stopping(self):
        es = self.early_stopping
        if es.enabled is True and not self.has_validation:
            raise ValueError(
                "early_stopping.enabled is true but there is no validation data: set data.validation or "
                "data.val_fraction, or early_stopping.enabled: auto (on only with validation data) or false"
            )
        if es.patience < 1 and (es.enabled is True or (es.enabled == "auto" and self.has_validation)):
            raise ValueError(
                f"early_stopping.patience must be at least 1 when early stopping is on (got {es.patience}); "
                f"set early_stopping.enabled: false to train without it"
            )
        return self

    @model_validator(mode="after")
    def _packing_needs_our_attention(self):
        attn = self.model.attn_implementation
        if self.data.packing and attn is not None and attn not in ROUTES:
            # transformers' implementations take no example boundaries from position_ids: a packed row
            # would attend across its examples (tests/data/test_packing.py shows it for eager).
            raise ValueError(
                f"model.attn_implementation {attn!r} lets the examples packed into one row attend to each other; "
                f"use {', '.join(ROUTES)} (null = gptoss_sink), or set data.packing: false"
            )
        return self

    @model_validator(mode="after")
    def _tools_are_function_schemas(self):
        try:
            parse_tools(self.data.tools, where="data.")
        except UserError as e:
            raise ValueError(str(e)) from None
        return self

    @property
    def has_validation(self) -> bool:
        return bool(self.data.validation) or self.data.val_fraction > 0

    def early_stopping_on(self, validation_rows: int) -> bool:
        """Whether early stopping runs, given the validation rows the data stage produced: `enabled: auto`
        means on exactly when there are some; `true` without any is a mistake (a run that cannot stop early
        when the recipe says it should)."""
        enabled = self.early_stopping.enabled
        if enabled == "auto":
            return validation_rows > 0
        if enabled and not validation_rows:
            raise UserError(
                f"{self.where('early_stopping', 'enabled')}: early_stopping.enabled is true but the validation set is "
                f"empty; raise data.val_fraction or set data.validation, or set early_stopping.enabled: auto or false"
            )
        return bool(enabled)

    # Where this recipe came from (set by load_recipe; not part of the schema): the file, and the line of
    # each key written in it (keys set on the command line have none).
    _source: str = "recipe"
    _lines: dict = {}

    def where(self, *key: str) -> str:
        """'file:line' of a key as written in the recipe file (or of its section), else 'file'."""
        return _at(self._source, self._lines, key)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def fingerprint(self) -> dict:
        """The settings that define a run: another run in the same output_dir must match these to resume it.

        Length (epochs, max_steps), evaluation, early stopping, checkpointing and logging may change
        between an interrupted run and its continuation."""
        d = self.model_dump(mode="json")
        t = d["train"]
        return {
            "model": d["model"]["path"],
            "lora": d["lora"],
            "router": d["router"],
            "data": d["data"],
            "train": {
                k: t[k]
                for k in (
                    "micro_batch_size",
                    "grad_accum",
                    "lr",
                    "scheduler",
                    "warmup_ratio",
                    "min_lr_ratio",
                    "weight_decay",
                    "seed",
                )
            },
        }

    def fingerprint_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:16]


def validate_dict(raw: Any, source: str = "recipe", lines: dict | None = None) -> Recipe:
    """Validate a recipe mapping; `lines` (key path -> line in the file) puts the line into errors."""
    if not isinstance(raw, dict):
        raise UserError(
            f"{source}: a recipe is a YAML mapping of sections (model:, data:, train:, ...), got {type(raw).__name__}"
        )
    lines = lines or {}
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(first_error(e, Recipe, lambda loc: _at(source, lines, loc))) from None
    recipe._source = source
    recipe._lines = lines
    return recipe


def _at(source: str, lines: dict, key: tuple) -> str:
    """'source:line' for the deepest part of `key` whose line is known."""
    for n in range(len(key), 0, -1):
        k = tuple(key[:n])
        if k in lines:
            return source if lines[k] is None else f"{source}:{lines[k]}"  # None: set on the command line
    return source


def yaml_key_lines(text: str) -> dict[tuple, int]:
    """Line (1-based) of every mapping key and sequence item of a YAML document, by key path."""
    out: dict[tuple, int] = {}

    def walk(node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (k.value,)
                out[key] = k.start_mark.line + 1
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                out[prefix + (i,)] = v.start_mark.line + 1
                walk(v, prefix + (i,))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return out


# ---- overrides -----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key.sub=value (e.g. train.lr=1e-4)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"override '{text}': empty key")
    try:
        parsed = load_yaml(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"override '{text}': the value is not valid YAML ({str(e).splitlines()[0]})") from None
    return key.split("."), parsed


def apply_override(raw: dict, parts: list[str], value: Any, source: str) -> None:
    node = raw
    for i, part in enumerate(parts[:-1]):
        cls = section_class(Recipe, tuple(parts[:i]))
        if cls is not None and part not in cls.model_fields:
            raise UserError(
                f"override {'.'.join(parts)}: unknown key '{'.'.join(parts[: i + 1])}'{did_you_mean(Recipe, part, tuple(parts[:i]))}"
            )
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


# ---- paths ---------------------------------------------------------------------------------------

_PATH_KEYS = (("model", "path"), ("data", "train"), ("data", "validation"), ("output_dir",), ("resume",))


def _get(raw: dict, key: tuple):
    node = raw
    for k in key:
        if not isinstance(node, dict) or k not in node:
            return None
        node = node[k]
    return node


def _set(raw: dict, key: tuple, value) -> None:
    node = raw
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value


def _resolve(value: str, base: Path, key: tuple) -> str:
    if key == ("resume",) and value in ("auto", "never"):
        return value
    p = Path(value).expanduser()
    if key == ("model", "path") and not p.is_absolute() and not str(value).startswith((".", "~")):
        # 'openai/gpt-oss-20b' is a hub id unless such a directory exists next to the recipe.
        if _HUB_ID.match(str(value)) and not (base / p).exists():
            return str(value)
    return str(p if p.is_absolute() else (base / p).resolve())


# ---- loading -------------------------------------------------------------------------------------


def read_recipe_text(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():  # a FIFO, a socket or a device is not a file either (and reading a FIFO would block)
        raise UserError(f"recipe '{path}' does not exist" if not p.exists() else f"recipe '{path}' is not a file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as e:
        raise UserError(f"recipe '{path}' cannot be read ({e.strerror or e}); check its permissions") from None


def parse_recipe_text(text: str, path: str | Path):
    """The YAML document of a recipe file, or a one-line UserError naming the line."""
    try:
        raw = load_yaml(text)
    except DuplicateKeyError as e:
        raise UserError(
            f"{path}:{e.line}: duplicate key '{e.key}' (first at line {e.first_line}); YAML would keep only the "
            f"last one: merge the two"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path}{where}: not valid YAML ({problem})") from None
    return {} if raw is None else raw


def read_recipe_file(path: str | Path) -> dict:
    return parse_recipe_text(read_recipe_text(path), path)


def load_recipe(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, check_paths: bool = True, cwd: Path | None = None
) -> Recipe:
    """Read, override, resolve and validate a recipe. Raises UserError with a one-line message."""
    path = Path(path)
    text = read_recipe_text(path)
    raw = parse_recipe_text(text, path)
    lines = yaml_key_lines(text)
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a recipe is a YAML mapping of sections (model:, data:, train:, ...), got {type(raw).__name__}"
        )
    base = path.resolve().parent
    here = (cwd or Path.cwd()).resolve()
    for key in _PATH_KEYS:
        v = _get(raw, key)
        if isinstance(v, str) and v:
            _set(raw, key, _resolve(v, base, key))
    for text in overrides:
        parts, value = parse_override(text)
        apply_override(raw, parts, value, str(path))
        # the value now comes from the command line: no line of the file describes it or anything under it
        lines = {k: v for k, v in lines.items() if tuple(k[: len(parts)]) != tuple(parts)}
        lines[tuple(parts)] = None
        if tuple(parts) in _PATH_KEYS and isinstance(value, str) and value:
            _set(raw, tuple(parts), _resolve(value, here, tuple(parts)))
    if _get(raw, ("output_dir",)) is None:
        raw["output_dir"] = str(here / "runs" / path.stem)
    recipe = validate_dict(raw, str(path), lines)
    if check_paths:
        check_recipe_paths(recipe)
    return recipe


def check_against_model(recipe: Recipe, cfg: dict) -> None:
    """Settings that only make sense up to the model's sizes (config.json)."""
    width = cfg["hidden_size"]
    if recipe.lora.rank > width:
        raise UserError(
            f"{recipe.where('lora', 'rank')}: lora.rank {recipe.lora.rank} is above the model's width (hidden_size "
            f"{width} in config.json); no adapted matrix has a rank above its smaller side: use at most {width} "
            f"(8 to 64 is usual)"
        )
    context = cfg.get("max_position_embeddings")
    if isinstance(context, int) and recipe.data.max_seq_len > context:
        raise UserError(
            f"{recipe.where('data', 'max_seq_len')}: data.max_seq_len {recipe.data.max_seq_len} is above the model's "
            f"context (max_position_embeddings {context} in config.json): use at most {context}"
        )


def check_recipe_paths(recipe: Recipe) -> None:

    try:
        # config.json, the shard index and every safetensors header (names, dtypes, shapes; no tensor data):
        # a broken checkpoint fails here, before a data render that can take minutes
        cfg = check_checkpoint(recipe.model.path)
    except CheckpointError as e:
        raise UserError(f"{recipe.where('model', 'path')}: model.path: {e}") from None
    check_against_model(recipe, cfg)
    for key in ("train", "validation"):
        v = getattr(recipe.data, key)
        if v and not Path(v).exists():
            raise UserError(f"{recipe.where('data', key)}: data.{key}: '{v}' does not exist")
    if recipe.resume not in ("auto", "never"):
        p = Path(recipe.resume)
        if not (p / ADAPTER_CONFIG).is_file() or not (p / TRAINER_STATE).is_file():
            raise UserError(
                f"{recipe.where('resume')}: resume: '{p}' is not a training checkpoint (expected {ADAPTER_CONFIG} and {TRAINER_STATE}); use auto, never or a checkpoints/step-* directory"
            )
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{recipe.where('output_dir')}: output_dir: '{out}' is a file")
    parent = next((p for p in (out, *out.parents) if p.exists()), None)
    if parent is None or not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"{recipe.where('output_dir')}: output_dir: '{out}' cannot be written ({parent} is not a writable directory)"
        )
