"""The detector's settings, split by how long they live.

- `DetectorConfig`: the architecture. Stored in the weights file; the tensors must match it.
- `DecodeConfig`: how boxes are read off the last layer. Overridable per call.
- `TrainConfig`: the training recipe. Its defaults are the recipe of the shipped weights, and
  every checkpoint stores the one it was trained with, so a resume cannot silently change it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

# nuScenes detection config: max_boxes_per_sample. The devkit refuses a submission with more.
MAX_BOXES_PER_SAMPLE = 500


def _positive_ints(obj, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{type(obj).__name__}.{name} must be a positive int, got {value!r}")


def _from_dict(cls, d: dict, tuples: tuple[str, ...] = ()):
    if not isinstance(d, dict):
        raise ValueError(f"{cls.__name__} must be read from a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {[f.name for f in fields(cls)]}")
    d = {k: (tuple(v) if k in tuples and isinstance(v, list) else v) for k, v in d.items()}
    return cls(**d)


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture of the synthetic-scene detector (see docs/detector.md).

    A frozen ResNet-style backbone (stride 16), PETR's 3D position embedding, and PETR's decoder
    (6 post-norm layers, 256 channels, 8 heads, FFN 2048) whose queries start as learned content
    at learned 3D anchors: all a query learns about a frame comes through cross-attention.
    """

    image_width: int = 352
    image_height: int = 128
    backbone_channels: tuple[int, ...] = (32, 64, 128, 224)  # stem + three stages: stride 16
    backbone_blocks: tuple[int, ...] = (1, 1, 2)  # basic blocks per stage after the stem
    num_queries: int = 200
    num_classes: int = 10
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 2048
    num_layers: int = 6

    def __post_init__(self):
        _positive_ints(
            self,
            ("image_width", "image_height", "num_queries", "num_classes", "embed_dims", "num_heads", "ffn_dims",
             "num_layers"),
        )  # fmt: skip
        if len(self.backbone_blocks) != len(self.backbone_channels) - 1:
            raise ValueError(
                f"need one block count per stage after the stem: backbone_channels {self.backbone_channels}, "
                f"backbone_blocks {self.backbone_blocks}"
            )
        stride = self.stride
        if self.image_width % stride or self.image_height % stride:
            raise ValueError(
                f"image size {self.image_width}x{self.image_height} must be a multiple of the stride {stride}"
            )

    @property
    def stride(self) -> int:
        """Pixels per key: each backbone stage halves the resolution."""
        return 2 ** len(self.backbone_channels)

    @property
    def feature_shape(self) -> tuple[int, int]:
        """(rows, columns) of keys per camera."""
        return self.image_height // self.stride, self.image_width // self.stride

    @property
    def num_keys(self) -> int:
        """Keys per frame: six cameras x rows x columns."""
        rows, cols = self.feature_shape
        return 6 * rows * cols

    @property
    def default_k(self) -> int:
        """Voting queries scaled to the query count as StreamPETR's 175 of 900."""
        return max(1, round(175 * self.num_queries / 900))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        return _from_dict(cls, d, tuples=("backbone_channels", "backbone_blocks"))


@dataclass(frozen=True)
class DecodeConfig:
    """How detections are read off the last decoder layer (NMS-free, as the PETR family).

    max_detections: the top (query, class) pairs by sigmoid score reported per frame.
    """

    max_detections: int = 300

    def __post_init__(self):
        m = self.max_detections
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_BOXES_PER_SAMPLE:
            raise ValueError(
                f"max_detections must be an int in [1, {MAX_BOXES_PER_SAMPLE}] (the devkit's cap), got {m!r}"
            )


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe; the defaults are what trained the shipped weights.

    The backbone is frozen (its features are computed once per frame and cached), so training
    costs the position embedding and the decoder only. Denoising queries (DN-DETR, as StreamPETR
    trains) speed up the set-prediction training that makes DETR-style decoders slow to learn.
    """

    iterations: int = 6000
    batch: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup: int = 300
    grad_clip: float = 35.0
    # Denoising: G groups of noised ground-truth centres, with G x (most boxes in a frame of the
    # batch) <= dn_queries; a centre moved by more than dn_split of its half size (in the unit
    # cube of noise) must be rejected (a negative), as StreamPETR's split of 0.75.
    dn_queries: int = 100
    dn_groups: int = 5
    dn_noise: float = 1.0
    dn_split: float = 0.75
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self):
        _positive_ints(self, ("iterations", "batch", "checkpoint_every"))
        for name in ("lr", "weight_decay", "grad_clip", "dn_noise", "dn_split"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("warmup", "dn_queries", "dn_groups", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _from_dict(cls, d)
