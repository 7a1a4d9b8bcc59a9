"""Typed configuration schema: one dataclass per group, merged as schema <- preset YAML <- CLI overrides.

Every field has an explicit default so the resolved config saved with a run states everything (SpikingJelly
#160: a silently changed default surrogate broke reproductions). Choices are checked in ``validate`` so all
problems are reported at once, each naming its full key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Valid values of the enumerated fields: validation and error messages read them from here.
CHOICES: dict[str, tuple[str, ...]] = {
    "model.neuron.type": ("lif", "plif", "if"),
    "model.neuron.surrogate": ("atan", "sigmoid", "rect"),
    "model.neuron.backend": ("auto", "fused", "reference"),
    "model.connection": ("default", "spiking", "sew_add", "sew_iand", "membrane", "da"),
    "model.da.domain": ("spike", "membrane"),
    "model.da.span": ("stage", "network"),
    "model.da.weights": ("learnable", "fixed"),
    "model.checkpointing": ("none", "block", "time", "block_time", "auto"),
    "model.spike_storage": ("float", "byte", "bit"),
    "data.format": ("ffrecord",),
    "data.loader": ("dali", "torch"),
    "data.payload": ("auto", "jpeg_label", "pickle"),
    "data.verify": ("auto", "full", "header"),
    "data.cpu_resample": ("torch", "dali"),
    "train.loss": ("mean_output", "per_timestep"),
    "train.nan_policy": ("stop", "skip"),
    "train.precision": ("auto", "fp32", "bf16-mixed", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "optim.name": ("sgd", "adamw", "lamb"),
    "optim.schedule": ("cosine", "step", "constant"),
    "tracking.backend": ("mlflow", "none"),
    "launch.mode": ("local", "slurm"),
}


@dataclass
class NeuronConfig:
    """Spiking neuron and surrogate gradient; every default is explicit and logged with the run."""

    type: str = "lif"  # lif | plif (learnable tau) | if
    tau: float = 2.0  # membrane time constant (LIF/PLIF init)
    v_threshold: float = 1.0
    v_reset: float | None = 0.0  # None = soft reset (subtract threshold)
    decay_input: bool = True
    detach_reset: bool = True
    surrogate: str = "atan"  # atan | sigmoid | rect
    surrogate_alpha: float = 2.0
    backend: str = "auto"  # auto (= fused) | fused | reference (the autograd loop, for checking)


@dataclass
class DAConfig:
    """Densely additive connection: the four DANet architectures are domain x span."""

    domain: str = "membrane"  # spike | membrane
    span: str = "network"  # stage | network
    weights: str = "learnable"  # learnable | fixed (all alpha = 1: the identity-residual stream)


@dataclass
class ModelConfig:
    name: str = "danet18"  # a name from `orchestrator models list`
    T: int = 4  # time steps
    num_classes: int = 1000
    in_channels: int = 3
    width: int = 64  # channels of the first stage (64 = the reference ResNet)
    input_size: int = 224  # <= 64 uses a CIFAR-style stem (3x3 conv, no max-pool)
    connection: str = "default"  # default = the model name's own connection
    da: DAConfig = field(default_factory=DAConfig)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    zero_init_residual: bool = False
    checkpointing: str = "none"  # none | block | time | block_time | auto
    spike_storage: str = "float"  # float | byte | bit
    memory_budget_gb: float = 0.0  # per device, for checkpointing=auto (0 = the device's memory)
    # BatchNorm + LIF/IF/PLIF as one op: true | false | auto (where measured faster than the pair: the CPU
    # kernels; not yet on CUDA, whose Triton kernels true selects)
    fuse_bn_neuron: Any = "auto"
    fuse_da: bool = False  # learnable DA's weighted sums as Triton kernels on CUDA; off until measured faster


@dataclass
class DataConfig:
    name: str = "digits"  # digits = the bundled scikit-learn set, built on first use
    root: str = ".cache/data/digits"  # dataset folder: meta.json, train.ffr/, val.ffr/
    format: str = "ffrecord"
    loader: str = "dali"
    payload: str = "auto"  # auto = read meta.json
    trust_pickle: bool = False  # HFAiLab's pickled ImageNet layout, read with a restricted unpickler
    # launch-time check before any rank starts: full = every record's CRC, header = tables only,
    # auto = full when the FFRecord files total <= 4 GiB (seconds), else header (a corrupt record met later
    # stops the run with exit 2 and the last checkpoint kept)
    verify: str = "auto"
    image_size: int = 224  # training crop
    val_resize: int = 256  # shorter side before the validation center crop
    rrc_scale_min: float = 0.08  # random-resized-crop area range lower bound
    rrc_ratio_min: float = 0.75
    rrc_ratio_max: float = 1.3333333
    hflip: bool = True
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    num_threads: int = 2  # DALI CPU threads per rank
    # CPU training pipeline only: who resizes the decoded crop window to image_size^2. torch = a vectorized uint8
    # antialiased bilinear (~4x cheaper than DALI's CPU resampler, same filter family), dali = DALI's resize.
    # On a GPU DALI always does it.
    cpu_resample: str = "torch"
    prefetch: int = 2
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0 = no limit)
    global_batch_size: int = 256  # across all ranks, per optimizer step
    micro_batch_size: int = 0  # per rank per forward; 0 = global / world size (no accumulation)
    seed: int = 0
    loss: str = "mean_output"  # mean_output | per_timestep (TET-style)
    label_smoothing: float = 0.0
    grad_clip: float = 0.0  # 0 = off
    precision: str = "auto"  # auto = bf16-mixed (autocast) on CUDA, fp32 on CPU; orchestrator/train/precision.py
    device: str = "auto"
    channels_last: bool = False
    compile: bool = False
    ema_decay: float = 0.0  # 0 = off
    eval_every_epochs: int = 1
    log_every_steps: int = 10
    # A rank with no finished step for this long prints where every thread is (orchestrator/train/stall.py), and
    # again as long as it lasts; below the process group's 300 s timeout, so a hang is shown before it ends the
    # job. Evaluation, checkpoints and the first step are not counted. 0 = off.
    stall_report_s: int = 120
    nan_policy: str = "stop"  # stop | skip
    nan_skip_limit: int = 10
    checkpoint_every_steps: int = 0  # 0 = at each epoch end only
    keep_top_k: int = 2  # DeepSpeed checkpoints kept by val top-1, plus the last
    deterministic: bool = True
    # cuDNN times each convolution's algorithms on its first shapes and keeps the fastest (CUDA only). Off
    # whenever train.deterministic is set: the chosen algorithm may then differ from run to run.
    cudnn_benchmark: bool = True


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw | lamb
    lr: float = 0.1  # at the reference batch below; scaled linearly by global batch
    reference_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    step_milestones: list[int] = field(default_factory=lambda: [30, 60, 90])
    step_gamma: float = 0.1
    min_lr: float = 0.0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0  # 0 | 1 | 2
    gradient_accumulation_steps: int = 0  # 0 = derived from the batch sizes
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed JSON


@dataclass
class TrackingConfig:
    backend: str = "mlflow"
    tracking_uri: str = ""  # empty = MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    artifact_location: str = ""  # empty = ./mlartifacts beside the sqlite store
    experiment: str = ""  # empty = the preset's name
    run_name: str = ""  # empty = "<model>-T<T>-<date>"
    log_system_metrics: bool = True
    log_checkpoints: bool = True
    buffer_size: int = 10000  # metrics kept while the server is unreachable
    parent_run_id: str = ""  # MLflow run this run is a child of (a sweep's parent); "" = none
    register_model: str = ""  # registered-model name for the best weights; "" = log the model, do not register


@dataclass
class LaunchConfig:
    mode: str = "local"
    nodes: int = 1
    gpus_per_node: int = 8
    local_ranks: int = 2  # processes for a local (non-Slurm) run
    partition: str = ""
    time: str = "2-00:00:00"
    cpus_per_task: int = 8
    mem: str = ""
    account: str = ""
    signal_lead_s: int = 300  # pre-timeout signal lead; shrunk for short limits
    rank_timeout_s: int = 60  # a dead peer ends the others within this
    extra_sbatch: list[str] = field(default_factory=list)


@dataclass
class Config:
    preset: str = "digits"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
