"""The training configuration: typed dataclasses, one per concern, with checks on values.

Every field can be set in a YAML preset or on the command line as ``section.key=value``. The method's keys
(``method.*``) and the bank's (``bank.*``) were once in ``loss``; the old names still load (:mod:`pirl.config.legacy`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    # Image view I: RandomResizedCrop(image_size, scale=image_scale) of the (optionally upscaled) image.
    image_size: int = 224
    image_scale: tuple[float, float] = (0.08, 1.0)
    # Jigsaw view I^t: an independent RandomResizedCrop(jigsaw_crop, scale=jigsaw_scale), cut into a grid x grid
    # lattice of cells of jigsaw_crop // grid pixels; one patch_size patch per cell at a random offset.
    jigsaw_crop: int = 255
    jigsaw_scale: tuple[float, float] = (0.6, 1.0)
    patch_size: int = 64
    grid: int = 3
    # Train on a seeded random subset of this many images (0: all); the bank then has this many rows.
    subset: int = 0
    # Images whose shorter side is below this are upscaled (bicubic) before cropping; 0 keeps them as they are.
    min_size: int = 0
    # Photometric augmentation applied independently to the image and to every patch:
    # "vissl" (jitter 0.4/0.4/0.4/0.2, p=0.66 posterize/sharpness/solarize/autocontrast, grayscale 0.2, flip 0.5),
    # "simclr_blur" (flip, SimCLR colour distortion, Gaussian blur) or "light" (jitter 0.4 + grayscale + flip).
    augment: str = "vissl"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    workers: int = 4
    # When true, the DataLoader only decodes and resizes, and the views of a whole batch are made on the training
    # device (GPU or CPU) by pirl.data.batched: the same geometry, the augmentation as batched tensor ops.
    # About 30x the per-sample pipeline per CPU thread, so the data never holds up the step.
    batched_views: bool = False
    # Stop the run when more than this fraction of the images seen so far could not be decoded.
    max_bad_fraction: float = 0.01


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # a torchvision ResNet (models/trunk.py ARCHS) or timm:<model name> (needs timm)
    stem: str = "imagenet"  # "cifar": 3x3 stride-1 conv1 without max-pool, for 32-pixel inputs
    head: str = "linear"  # "linear" (paper) or "mlp" (VISSL's SimCLR-style heads)
    head_bn: bool = False  # end f and g with BatchNorm1d (no affine): centred embeddings, see models/heads.py
    embed_dim: int = 128
    mlp_hidden: int = 2048
    # Starting weights of the trunk: "" (random), torchvision:<weights enum>
    # (torchvision:ResNet50_Weights.IMAGENET1K_V2), timm:<model name> (needs timm) or the path of a pirl export,
    # run directory or checkpoint. Heads start random.
    init: str = ""


@dataclass
class MethodConfig:
    # "pirl", "npid" (NPID++, i.e. PIRL with lam = 0 and no transformed branch), or a baseline without a bank:
    # "jigsaw" (covariant: classify the permutation), "rotation" (covariant: classify the turn), "supervised";
    # the names of pirl.methods.METHODS
    name: str = "pirl"
    pretext: str = "jigsaw"  # "jigsaw", "rotation" or "jigsaw_rotation"
    lam: float = 0.5  # weight of the transformed-view term; 1 - lam weights the image term
    # Whether the transformed view's forward pass (the patches or the turned image) updates the trunk's BatchNorm
    # running statistics. true: as the paper and VISSL, so the frozen trunk is evaluated with statistics partly of
    # patches; false: it still normalises with its own batch statistics, but only the image view's batches move the
    # running estimates that evaluation and export use.
    transformed_bn_stats: bool = True
    # name=jigsaw: |T|, the size of the fixed permutation set chosen for maximal Hamming distance (Noroozi &
    # Favaro's 1000; at most (data.grid^2)! and 100,000)
    permutations: int = 1000


@dataclass
class BankConfig:
    # "replicated": every process holds all N bank rows; "sharded": process r holds a contiguous N / W block
    # (bank memory per GPU / W; rows are fetched from and updated on their owners, results are the same).
    kind: str = "replicated"
    negatives: int = 32000
    momentum: float = 0.5
    # storage of the bank rows: "float16" halves bank memory (656 MB -> 328 MB for 1.28M images) and the bytes
    # each gather reads; scores, loss and updates stay float32, cosine scores stay within 5e-4
    dtype: str = "float32"
    # "random": uniform rows (the paper, VISSL); "features": each row starts as the untrained network's f of its
    # un-augmented image (one forward pass over the data), so positives carry signal from the first step
    init: str = "random"
    exclude_positive: bool = False  # paper: negatives drawn from D \ {I}; VISSL draws from all of D
    share_negatives: bool = False  # one negative set per batch instead of one per sample


@dataclass
class LossConfig:
    form: str = "infonce"  # "infonce", "npid_nce" (NCE with a frozen Z, as VISSL) or "paper_nce" (Eq. 3-4)
    temperature: float = 0.07


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch, across all processes
    base_lr: float = 0.03  # per 256 images; lr = base_lr * batch_size / 256
    final_lr_ratio: float = 1e-3
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 1e-4  # not applied to BatchNorm parameters and biases
    nesterov: bool = False


@dataclass
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    amp: bool = True  # bf16/fp16 autocast on CUDA only; the loss is always computed in fp32
    channels_last: bool = True  # NHWC activations: faster convolutions on CUDA and on CPU (oneDNN)
    compile: bool = False
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    log_every: int = 10  # steps between metric records
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    keep_checkpoints: int = 2
    nonfinite: str = "stop"  # "stop" or "skip" a batch whose loss is NaN/inf
    # Under torchrun: a collective waiting this long for a lost process fails instead of hanging.
    dist_timeout_s: float = 600.0
    # Under torchrun: BatchNorm statistics over the global batch, so that W processes reproduce one process.
    sync_bn: bool = False
    # Online kNN monitor (labelled data or --val-data): weighted-kNN accuracy every knn_every epochs (0: off), on
    # up to knn_max_images memory and as many query images.
    knn_every: int = 1
    knn_max_images: int = 5000


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
