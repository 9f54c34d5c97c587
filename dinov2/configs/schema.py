"""The training config's sections as typed dataclasses (OmegaConf structured configs).

One dataclass per top-level section of ssl_default_config.yaml. Each field states its type and the
rules its value obeys (`option(...)`, see dinov2/configs/fields.py); a section's `check` holds the
rules that tie several of its fields together, and `SSLConfig.check` those that span sections. The
default values are stated once, in ssl_default_config.yaml (each field's default here is "???").

Usage:
    cfg = OmegaConf.merge(OmegaConf.structured(SSLConfig), load_default_config(), user_layer)
    problems = OmegaConf.to_object(cfg).problems()   # ["train.seed: must be >= 0, got -1", ...]
"""

from dataclasses import dataclass
from typing import Any

from dinov2.configs.fields import Section, option, problem, section
from dinov2.utils.dtypes import DTYPES

PRECISIONS = tuple(DTYPES)  # fp32, fp16, bf16
SHARDING_STRATEGIES = ("NO_SHARD", "SHARD_GRAD_OP", "FULL_SHARD")
PARTS = ("backbone", "dino_head", "ibot_head")
_PROBABILITY = {"ge": 0, "le": 1}


def _range_rule(low_inclusive: bool) -> tuple[Any, str]:
    """A [low, high] pair inside [0, 1] (or (0, 1] when `low_inclusive` is False), low <= high."""

    def ok(v: Any) -> bool:
        return len(v) == 2 and (0 <= v[0] if low_inclusive else 0 < v[0]) and v[0] <= v[1] <= 1

    return ok, "must be [low, high] with 0 < low <= high <= 1"


@dataclass
class Model(Section):
    """Meta's MODEL section, kept so their configs load."""

    WEIGHTS: str = option()  # unused


@dataclass
class MixedPrecision(Section):
    """The dtypes of one model part: parameters (compute), gradient reduction, buffers."""

    param_dtype: str = option(choices=PRECISIONS)
    reduce_dtype: str = option(choices=PRECISIONS)
    buffer_dtype: str = option(choices=PRECISIONS)


@dataclass
class PartPrecision(Section):
    """How one model part (backbone, DINO head, iBOT head) is sharded and which dtypes it uses."""

    # FSDP2: FULL_SHARD frees the gathered parameters after forward, SHARD_GRAD_OP after backward
    sharding_strategy: str = option(choices=SHARDING_STRATEGIES)
    mixed_precision: MixedPrecision = section(MixedPrecision)


@dataclass
class ModelPrecision(Section):
    """Sharding and dtypes of the three parts of the student or of the teacher."""

    backbone: PartPrecision = section(PartPrecision)
    dino_head: PartPrecision = section(PartPrecision)
    ibot_head: PartPrecision = section(PartPrecision)


@dataclass
class ComputePrecision(Section):
    """compute_precision: loss scaling, and sharding/dtypes per model part."""

    grad_scaler: bool = option()  # loss scaling, only used when a part computes in fp16
    teacher: ModelPrecision = section(ModelPrecision)
    student: ModelPrecision = section(ModelPrecision)


@dataclass
class Dino(Section):
    """dino: the image-level (CLS token) loss and its projection head."""

    loss_weight: float = option(ge=0)
    head_n_prototypes: int = option(ge=1)
    head_bottleneck_dim: int = option(ge=1)
    head_nlayers: int = option(ge=1)
    head_hidden_dim: int = option(ge=1)
    koleo_loss_weight: float = option(ge=0)


@dataclass
class Ibot(Section):
    """ibot: the masked-patch loss, its masking and its head."""

    loss_weight: float = option(ge=0)
    mask_sample_probability: float = option(**_PROBABILITY)  # share of global crops that get a mask
    mask_ratio_min_max: list[float] = option(rule=_range_rule(low_inclusive=True))
    separate_head: bool = option()
    head_n_prototypes: int = option(ge=1)
    head_bottleneck_dim: int = option(ge=1)
    head_nlayers: int = option(ge=1)
    head_hidden_dim: int = option(ge=1)


@dataclass
class CollapseThresholds(Section):
    """train.collapse_thresholds: when the collapse monitor warns (see dinov2/train/collapse.py)."""

    max_entropy_frac: float = option()  # of log K
    max_kl_frac: float = option()  # of log K
    min_cls_std_ratio: float = option()  # of 1/sqrt(D)


@dataclass
class Train(Section):
    """train: data, run length, checkpoints, logging and the distributed set-up."""

    batch_size_per_gpu: int = option(ge=1)  # images per process per iteration
    # OmegaConf's Union cannot hold a list, so value-or-list fields are Any and `accepts` is checked.
    dataset_path: Any = option(
        accepts=str | list[str],
        described="a folder path or a list of folder paths",
        rule=(lambda v: not isinstance(v, list) or len(v) > 0, "must name at least one folder"),
        exists="folder",
    )
    dataset_ignore_fraction: Any = option(
        accepts=float | list[float],
        described="a float or a list of floats (one per dataset_path)",
        ge=0,
        lt=1,
    )
    check_corrupted: bool = option()
    max_failed_fraction: float = option(**_PROBABILITY)
    output_dir: str = option()
    saveckp_freq: int = option()  # unused (DINOv2 compatibility)
    checkpoint_period_iterations: int = option(ge=1)
    checkpoint_keep: int = option(ge=1)
    log_period_iterations: int = option(ge=1)
    seed: int = option(ge=0)
    num_workers: int = option(ge=0)
    OFFICIAL_EPOCH_LENGTH: int = option(ge=1)  # iterations per "epoch"
    cache_dataset: bool = option()  # unused (DINOv2 compatibility)
    centering: str = option(choices=("centering", "sinkhorn_knopp"))
    compile: bool = option()
    distributed: str = option(choices=("ddp", "fsdp"))
    max_iterations: int | None = option(ge=1)
    collapse_check_period_iterations: int = option(ge=0)
    collapse_thresholds: CollapseThresholds = section(CollapseThresholds)
    collapse_stop_after_warnings: int = option(ge=0)
    collective_timeout_minutes: float = option(gt=0)

    def check(self, prefix: str) -> list[str]:
        paths, fractions = self.dataset_path, self.dataset_ignore_fraction
        n_paths = len(paths) if isinstance(paths, list) else 1
        if isinstance(fractions, list) and len(fractions) != n_paths:
            return [
                f"{prefix}.dataset_ignore_fraction: has {len(fractions)} values but "
                f"{prefix}.dataset_path has {n_paths} folders (give one value per folder, or a single float)"
            ]
        return []


@dataclass
class Student(Section):
    """student: the backbone architecture, and the weights continued pretraining starts from."""

    arch: str = option(choices=("vit_small", "vit_base", "vit_large", "vit_giant2"))
    patch_size: int = option(ge=1)
    embed_dim: int | None = option(ge=1)  # null: the arch's token width
    depth: int | None = option(ge=1)  # null: the arch's number of blocks
    num_heads: int | None = option(ge=1)  # null: the arch's attention heads
    drop_path_rate: float = option(ge=0, lt=1)
    layerscale: float | None = option(ge=0)
    drop_path_uniform: bool = option()
    pretrained_weights: str = option(exists="file")  # Meta's released backbone (.pth); '' = none
    head_warmup_iterations: int = option(ge=0)
    ffn_layer: str = option(choices=("mlp", "swiglu", "swiglufused", "identity"))
    block_chunks: int = option(ge=0)
    qkv_bias: bool = option()
    proj_bias: bool = option()
    ffn_bias: bool = option()
    num_register_tokens: int = option(ge=0)
    interpolate_antialias: bool = option()
    interpolate_offset: float = option()

    def check(self, prefix: str) -> list[str]:
        width, heads = self.embed_dim, self.num_heads
        if width is not None and heads is not None and heads >= 1 and width % heads:
            return [f"{prefix}.embed_dim: must be divisible by {prefix}.num_heads ({heads}), got {width}"]
        return []


@dataclass
class Teacher(Section):
    """teacher: the EMA momentum and the softmax temperature schedules."""

    momentum_teacher: float = option(**_PROBABILITY)
    final_momentum_teacher: float = option(**_PROBABILITY)
    warmup_teacher_temp: float = option(gt=0)
    teacher_temp: float = option(gt=0)
    warmup_teacher_temp_epochs: int = option(ge=0)


@dataclass
class Optim(Section):
    """optim: AdamW, its schedules (in epochs) and the batch-size scaling of the learning rate."""

    epochs: int = option(ge=1)
    weight_decay: float = option(ge=0)
    weight_decay_end: float = option(ge=0)
    base_lr: float = option(ge=0)  # for a total batch size of 1024
    lr: float = option(ge=0)  # set at start-up from base_lr by the scaling rule
    warmup_epochs: int = option(ge=0)
    min_lr: float = option(ge=0)
    clip_grad: float = option(ge=0)
    freeze_last_layer_epochs: int = option(ge=0)
    scaling_rule: str = option(choices=("sqrt_wrt_1024", "linear_wrt_1024", "none"))
    patch_embed_lr_mult: float = option(ge=0)
    layerwise_decay: float = option(gt=0, le=1)
    adamw_beta1: float = option(ge=0, lt=1)
    adamw_beta2: float = option(ge=0, lt=1)

    def check(self, prefix: str) -> list[str]:
        return problem(f"{prefix}.warmup_epochs", self.warmup_epochs <= self.epochs,
                       f"must be <= {prefix}.epochs ({self.epochs})", self.warmup_epochs)  # fmt: skip


@dataclass
class ColorAugmentation(Section):
    """crops.color_augmentation: DINOv2's photometric recipe (BYOL's)."""

    prob: float = option(**_PROBABILITY)  # probability of ColorJitter on a crop
    brightness: float = option(ge=0)
    contrast: float = option(ge=0)
    saturation: float = option(ge=0)
    hue: float = option(ge=0, le=0.5)
    grayscale_prob: float = option(**_PROBABILITY)
    solarize_prob: float = option(**_PROBABILITY)  # second global crop only


@dataclass
class Crops(Section):
    """crops: the multi-crop geometry and the augmentations of each crop."""

    global_crops_scale: list[float] = option(rule=_range_rule(low_inclusive=False))
    local_crops_number: int = option(ge=0)
    local_crops_scale: list[float] = option(rule=_range_rule(low_inclusive=False))
    global_crops_size: int = option(ge=1)
    local_crops_size: int = option(ge=1)
    stain_jitter: float = option(ge=0)  # Giemsa stain (HED-space) jitter strength; 0 disables
    color_augmentation: ColorAugmentation = section(ColorAugmentation)
    blur_prob: list[float] = option(
        rule=(
            lambda v: len(v) == 3 and all(0 <= p <= 1 for p in v),
            "must be 3 probabilities [global crop 1, global crop 2, local crops]",
        )
    )


@dataclass
class Evaluation(Section):
    """evaluation: teacher exports and the online kNN check."""

    eval_period_iterations: int = option(ge=0)  # export the teacher backbone every this many iterations
    knn_dataset_path: str = option(exists="folder")  # labelled class folders; '' disables
    knn_period_iterations: int = option(ge=0)  # 0 disables the online kNN check
    knn_max_images: int = option(ge=2)

    def check(self, prefix: str) -> list[str]:
        if self.knn_period_iterations > 0 and not self.knn_dataset_path:
            return [f"{prefix}.knn_dataset_path: required when {prefix}.knn_period_iterations > 0"]
        return []


@dataclass
class SSLConfig(Section):
    """The whole training config: one field per section of ssl_default_config.yaml."""

    MODEL: Model = section(Model)
    compute_precision: ComputePrecision = section(ComputePrecision)
    dino: Dino = section(Dino)
    ibot: Ibot = section(Ibot)
    train: Train = section(Train)
    student: Student = section(Student)
    teacher: Teacher = section(Teacher)
    optim: Optim = section(Optim)
    crops: Crops = section(Crops)
    evaluation: Evaluation = section(Evaluation)

    def check(self, prefix: str) -> list[str]:
        """Rules across sections: crop sizes fit the patch size; FSDP pairs teacher and student parts."""
        problems = []
        patch = self.student.patch_size
        for name in ("global_crops_size", "local_crops_size"):
            size = getattr(self.crops, name)
            if patch >= 1 and size % patch:
                low, high = (size // patch) * patch, (size // patch + 1) * patch
                problems.append(
                    f"crops.{name}: must be a multiple of student.patch_size ({patch}), got {size} "
                    f"(nearest: {low if low else high} or {high})"
                )
        if self.train.distributed == "fsdp":
            # The EMA pairs each teacher part with its student part: both sharded, or both not.
            for part in PARTS:
                student = getattr(self.compute_precision.student, part).sharding_strategy
                teacher = getattr(self.compute_precision.teacher, part).sharding_strategy
                problems += problem(
                    f"compute_precision.teacher.{part}.sharding_strategy",
                    (student == "NO_SHARD") == (teacher == "NO_SHARD"),
                    f"must be NO_SHARD exactly when compute_precision.student.{part}.sharding_strategy is "
                    f"(it is {student!r}): the teacher's EMA pairs its tensors with the student's",
                    teacher,
                )
        return problems
