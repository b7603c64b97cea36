"""The typed configuration of ``fleetlm tune CONFIG.yaml``.

One pydantic model per pipeline stage; every model rejects unknown keys, so a typo in
the YAML is an error naming the field, never a silent default, and a key given twice is
an error too (:mod:`fleetlm.config` reads the file and formats the problems). Relative paths in the
YAML are resolved against the YAML file's folder by :func:`load_config`.

This module knows nothing about how the stages run; it only describes what they are
asked to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fleetlm.config import StrictModel, format_errors, load_yaml, problems_error
from fleetlm.errors import ConfigError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DOCS = "docs/tuning.md"

class TaskConfig(StrictModel):
    """What the adapter is for."""

    type: Literal["classification", "completion", "chat"]
    # One sentence shown to the teacher (synthesis) and in the model card.
    description: str = ""
    # The system message of every training and serving prompt; None = no system
    # message (the model's chat template may still add its default one).
    system_prompt: str | None = None
    # Classification: the label set; None = every label found in the training data.
    labels: list[str] | None = None
    # Classification: the instruction put before the text in the user message.
    instruction: str = "Classify the text. Answer with the label only."


class DataConfig(StrictModel):
    """Where the raw rows come from and which columns hold what."""

    # One file, or a list whose rows are concatenated (e.g. in-scope + out-of-scope rows).
    path: Path | list[Path]
    format: Literal["auto", "csv", "jsonl"] = "auto"
    # A separate validation file (or list); None = carve one from `path` (stratified for
    # classification).
    validation_path: Path | list[Path] | None = None
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    # Keep at most this many rows of `path` (a seeded sample), e.g. for a quick run.
    max_rows: int | None = Field(None, gt=0)
    # Keep at most this many validation rows (seeded, stratified).
    max_validation_rows: int | None = Field(None, gt=0)

    @property
    def paths(self) -> list[Path]:
        return list(self.path) if isinstance(self.path, list) else [self.path]

    @property
    def validation_paths(self) -> list[Path]:
        v = self.validation_path
        return [] if v is None else (list(v) if isinstance(v, list) else [v])


class PrepareConfig(StrictModel):
    """Cleaning before anything else sees the data."""

    normalize: bool = True  # NFKC unicode and collapsed whitespace
    min_chars: int = Field(1, ge=0)
    max_chars: int = Field(2000, gt=0)
    dedup: Literal["off", "exact", "near"] = "near"
    # Jaccard similarity of word shingles above which two rows are near-duplicates.
    near_dup_threshold: float = Field(0.9, gt=0.0, le=1.0)
    # Replace personal data by the router's placeholders (<PERSON_1>, ...).
    anonymize: bool = False


class TeacherConfig(StrictModel):
    """Any OpenAI-compatible endpoint, a local fleetlm server included."""

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    temperature: float = Field(0.9, ge=0.0, le=2.0)
    max_tokens: int = Field(512, gt=0)


class SynthesizeConfig(StrictModel):
    """Self-instruct style expansion with a teacher model (off by default)."""

    enabled: bool = False
    teacher: TeacherConfig | None = None
    # Classification: new examples to ask for per label; other tasks: per seed batch.
    per_label: int = Field(8, ge=0)
    num_instructions: int = Field(0, ge=0)
    seed_examples: int = Field(5, gt=0)
    concurrency: int = Field(4, gt=0)
    # Budget caps: the stage stops asking once either is reached.
    max_requests: int = Field(200, gt=0)
    max_tokens_total: int = Field(200_000, gt=0)

    @model_validator(mode="after")
    def _teacher_when_enabled(self) -> SynthesizeConfig:
        if self.enabled and self.teacher is None:
            raise ValueError("synthesize.teacher is required when synthesize.enabled is true "
                             "(give base_url and model of an OpenAI-compatible endpoint)")
        return self


class FilterConfig(StrictModel):
    """What synthetic rows must pass to be kept."""

    min_chars: int = Field(3, ge=0)
    max_chars: int = Field(1000, gt=0)
    dedup_threshold: float = Field(0.85, gt=0.0, le=1.0)
    # Ask the teacher to label the row again and keep it only when the label agrees.
    confirm_labels: bool = True


class TrainConfig(StrictModel):
    method: Literal["lora", "full"] = "lora"
    rank: int = Field(16, gt=0, le=256)
    alpha: float = Field(32.0, gt=0)
    # LoRA dropout; 0 by default: on CPU its random masks took ~30% of a training step
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj"])
    use_rslora: bool = False
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # overrides epochs
    batch_size: int = Field(16, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_seq_len: int = Field(256, gt=8)
    bf16: bool = True  # bfloat16 autocast (CPU and GPU)
    eval_every: int = Field(100, gt=0)  # optimizer steps between validations
    # Stop after this many validations without improvement; 0 = never stop early.
    early_stopping_patience: int = Field(3, ge=0)
    # What "improvement" means, and which adapter is kept: "accuracy" (the share of
    # validation rows whose whole answer, end token included, is the greedy choice under
    # teacher forcing -- exactly the rows greedy decoding answers right; ties go to the
    # lower loss), "loss" (mean answer-token cross-entropy), or "auto": accuracy for
    # classification, loss otherwise.
    early_stopping_metric: Literal["auto", "accuracy", "loss"] = "auto"
    save_every: int = Field(100, gt=0)  # optimizer steps between checkpoints
    # validation rows of each validation during training (evenly spaced over the split)
    eval_loss_rows: int = Field(256, gt=0)
    seed: int = 0
    threads: int | None = Field(None, gt=0)  # torch threads; None = torch's default
    # attention kernel of the transformers model being trained (see train.build_model)
    attention: Literal["eager", "sdpa"] = "eager"
    # QLoRA: the frozen base's decoder projections stored as int8 (a scale per output row,
    # torchao's weight-only int8), LoRA on top; half a bfloat16 base's memory for them
    quantize_base: Literal["none", "int8"] = "none"

    @model_validator(mode="after")
    def _qlora_needs_lora(self) -> TrainConfig:
        if self.quantize_base != "none" and self.method != "lora":
            raise ValueError(f"quantize_base: {self.quantize_base} trains LoRA on a frozen "
                             "quantised base; use method: lora, or quantize_base: none")
        return self


class EvalConfig(StrictModel):
    enabled: bool = True
    # Validation rows evaluated (seeded sample); None = all.
    max_rows: int | None = Field(None, gt=0)
    # The untuned base is also scored, on this many rows (zero- and few-shot prompts are
    # long); None = every evaluated row, 0 = do not score the base.
    base_rows: int | None = Field(200, ge=0)
    few_shot: int = Field(5, ge=0)
    max_new_tokens: int = Field(64, gt=0)  # generation tasks


class PublishConfig(StrictModel):
    # None = the default adapter store (~/.local/share/fleetlm/adapters or $FLEETLM_HOME).
    adapters_dir: Path | None = None
    overwrite: bool = False
    # A running `fleetlm serve`: the adapter is loaded through POST /v1/adapters.
    serve_url: str | None = None
    intended_use: str = ""
    limitations: str = ""


class TuneConfig(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)  # the adapter's name in the store
    base_model: str = "smollm2-135m"
    task: TaskConfig
    data: DataConfig
    prepare: PrepareConfig = PrepareConfig()
    synthesize: SynthesizeConfig = SynthesizeConfig()
    filter: FilterConfig = FilterConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    publish: PublishConfig = PublishConfig()
    seed: int = 0
    # Run folder; None = runs/<name> under the current directory.
    output_dir: Path | None = None

    @field_validator("base_model")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("base_model must name a model (e.g. smollm2-135m or a local folder)")
        return v

    def run_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("runs") / self.name


def _resolve(base: Path, p: Any) -> Any:
    if p is None:
        return None
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def parse_config(raw: Any, *, base_dir: Path = Path("."), source: str = "config") -> TuneConfig:
    """Validate a parsed YAML/JSON mapping; relative paths are taken from ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the tune config must be a mapping of keys, got {type(raw).__name__}")
    raw = dict(raw)
    data = raw.get("data")
    if isinstance(data, dict):
        data = dict(data)
        for key in ("path", "validation_path"):
            if isinstance(data.get(key), list):
                data[key] = [_resolve(base_dir, p) for p in data[key]]
            elif key in data:
                data[key] = _resolve(base_dir, data[key])
        raw["data"] = data
    if "output_dir" in raw:
        raw["output_dir"] = _resolve(base_dir, raw["output_dir"])
    pub = raw.get("publish")
    if isinstance(pub, dict) and pub.get("adapters_dir") is not None:
        raw["publish"] = {**pub, "adapters_dir": _resolve(base_dir, pub["adapters_dir"])}
    try:
        return TuneConfig.model_validate(raw)
    except ValidationError as e:
        raise problems_error(source, "tune config", format_errors(e, DOCS)) from None


def load_config(path: Path) -> TuneConfig:
    """Read ``path`` (YAML) into a :class:`TuneConfig`; a key given twice in one mapping is
    an error."""
    path = Path(path)
    raw = load_yaml(path, missing=f"tune config {path} does not exist; pass the path of a "
                    "YAML file (examples/banking77.yaml is one)")
    return parse_config(raw, base_dir=path.parent, source=str(path))
