"""How an export trains: the training defaults (one place) and the parameter groups of the portable step.

Defaults follow what the weights are, not what the preset is called. Every trainable tensor of a pretrained
backbone learns at `BACKBONE_LR_RATIO` times the head's rate (discriminative fine-tuning: the new head moves fast,
the pretrained features slowly); randomly initialised weights have nothing to keep and learn at the full rate.
Biases and normalisation parameters (tensors of rank ≤ 1) get no weight decay, as in PyTorch's usual AdamW recipe.
LoRA's adapters are new tensors, like the head: a group of their own at the head's rate, and a bundle with adapters
starts from `ADAPTED_BASE_LR` (the text study's rate ablation, docs/study/text-lora-lr: head and adapters at 3e-3
came within 0.5-1.7 points of full fine-tuning where 1e-3 was 2.3-3.4 points short; adapters alone at 3× the head's
1e-3 gained nothing: 81.1/87.5% against 81.3/87.0% at k = 16/64).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from edgeadapt.runtime.manifest import DEFAULT_BATCH, DEFAULT_EPOCHS, ParamGroup

if TYPE_CHECKING:  # the plan module stays light: the CLI reads its defaults without onnx
    from edgeadapt.toolchain.stages import Lists

DEFAULT_WEIGHT_DECAY = 0.01  # AdamW's decoupled decay of the decayed groups
BASE_LR = {"adamw": 1e-3, "sgd": 1e-2}  # the head's rate, and every tensor's for random weights
ADAPTED_BASE_LR = {"adamw": 3e-3, "sgd": 1e-2}  # bundles with LoRA adapters: the head's and the adapters' rate
BACKBONE_LR_RATIO = 0.1  # pretrained backbone tensors: this times the base rate
# parameter group names (each also has a `_no_decay` group)
HEAD_GROUP, BACKBONE_GROUP, ADAPTER_GROUP = "task_head", "backbone", "adapters"


@dataclass(frozen=True)
class TrainingSpec:
    """What the manifest records as the bundle's defaults, and the groups its step applies."""

    loss: str
    optimizer: str
    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    backbone_lr_ratio: float
    groups: list[ParamGroup]
    accumulate: int = 1  # micro-batches of batch_size per update (`auto` on a small memory budget)

    def hyperparameters(self) -> dict[str, float]:
        accumulate = {"accumulate": float(self.accumulate)} if self.accumulate > 1 else {}
        return {"lr": self.lr, "batch_size": float(self.batch_size), "epochs": float(self.epochs),
                "weight_decay": self.weight_decay, "backbone_lr_ratio": self.backbone_lr_ratio, **accumulate}


def backbone_lr_ratio(requested: float | None, weights: str) -> float:
    if requested is not None:
        return requested
    return 1.0 if weights == "random" else BACKBONE_LR_RATIO


def parameter_groups(trainable: list[str], head: list[str], ranks: dict[str, int], weight_decay: float,
                     backbone_ratio: float, decay_norms: bool = False,
                     adapters: list[str] = ()) -> list[ParamGroup]:
    """head / backbone / adapters × decayed / not decayed (rank ≤ 1 tensors, unless `decay_norms`); empty groups
    left out."""
    head_names, adapter_names = set(head), set(adapters)
    groups: dict[tuple[str, bool], list[str]] = {}
    for name in trainable:
        decayed = decay_norms or ranks.get(name, 0) > 1
        part = HEAD_GROUP if name in head_names else ADAPTER_GROUP if name in adapter_names else BACKBONE_GROUP
        groups.setdefault((part, decayed), []).append(name)
    order = (BACKBONE_GROUP, ADAPTER_GROUP, HEAD_GROUP)
    ordered = sorted(groups.items(), key=lambda item: (order.index(item[0][0]), not item[0][1]))
    return [ParamGroup(name=part if decayed else f"{part}_no_decay",
                       lr_scale=backbone_ratio if part == BACKBONE_GROUP else 1.0,
                       weight_decay=weight_decay if decayed else 0.0, tensors=tensors)
            for (part, decayed), tensors in ordered]


def training_spec(opts, weights: str, trainable: list[str], head: list[str], ranks: dict[str, int],
                  batch_size: int | None = None, adapters: list[str] = (), accumulate: int = 1) -> TrainingSpec:
    """The spec of an export with options `opts` (ExportOptions) over these tensors."""
    decay = opts.weight_decay if opts.optimizer == "adamw" else 0.0
    ratio = backbone_lr_ratio(opts.backbone_lr_ratio, weights)
    groups = parameter_groups(trainable, head, ranks, decay, ratio, opts.decay_norms, adapters)
    base = (ADAPTED_BASE_LR if adapters else BASE_LR)[opts.optimizer]
    return TrainingSpec(loss=opts.loss, optimizer=opts.optimizer, lr=opts.lr or base,
                        weight_decay=decay, batch_size=batch_size or DEFAULT_BATCH, epochs=DEFAULT_EPOCHS,
                        backbone_lr_ratio=ratio, groups=groups, accumulate=accumulate)


@dataclass(frozen=True)
class TrainingPlan:
    """Everything the later stages need about what trains and how, decided once, before any artifact is written:
    artifacts, validation and the manifest take the source and this plan, never the export's options."""

    preset: str  # the resolved preset (what `auto` chose, not "auto")
    lists: "Lists"  # trainable, frozen parameters, frozen buffers
    training: TrainingSpec
    bn_policy: str
    split: bool  # also write the prefix and suffix graphs when the frozen part is a prefix
    ort_format: bool  # the plugin's .ort models too
    reasons: tuple[str, ...] = ()  # why `auto` chose the preset
    profile: str | None = None  # the device profile `auto` fitted

    @property
    def trainable(self) -> list[str]:
        return self.lists.trainable


def make_plan(opts, source, lists) -> TrainingPlan:
    """The plan of an export with options `opts` (ExportOptions) over `source` (stages.Source)."""
    ranks = {init.name: len(init.dims) for init in source.graph.graph.initializer}
    adapters = [name for t in source.lora.targets for name in (t.a, t.b)] if source.lora else []
    spec = training_spec(opts, source.weights, lists.trainable, source.head, ranks, opts.auto_batch, adapters,
                         opts.auto_accumulate)
    return TrainingPlan(opts.trainable, lists, spec, opts.bn, opts.split, opts.ort_format, tuple(opts.auto_notes),
                        opts.profile)
