"""The student's vision trunk: image -> feature maps at strides 8, 16 and 32, with a dense detection head on them.

Two trunks, one interface: ``forward(image) -> [P3, P4, P5]``, ``channels`` (of those maps) and ``head``, whose
per-level ``cv2`` branches give the box distributions (``4 * reg_max`` channels: left, top, right, bottom
distances from each cell's centre, as distributions over ``0 .. reg_max - 1`` strides, decoded as their
expectation — Ultralytics' DFL) and ``cv3`` branches the class logits (one sigmoid per class, no "no object").

- :class:`UltralyticsTrunk`: the backbone and neck of the teacher's own Ultralytics detector, rebuilt from its
  model YAML, with its ``Detect`` head, so a freshly built student that copies the teacher's weights
  (``teachers.base.StudentStart``) *is* the detector at the student's input size. Its modules are Ultralytics'
  own (imported from the ``ultralytics`` package, AGPL-3.0), so the student runs exactly the detector's code.
- :class:`TimmTrunk`: a timm mobile backbone from scratch (random init) + a small top-down FPN neck + a
  :class:`DenseHead` of the same shape, for graphs whose nodes offer no detector to start from.

The mask branch (:class:`Proto` + :class:`CoefHead`) is YOLACT's / YOLO-seg's: prototype masks on the stride-8
map upsampled to stride 4, and per-anchor coefficients; an object's mask is ``coef · protos``, cut to its box.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDES = (8, 16, 32)
PROTO_STRIDE = 4  # prototype masks: the stride-8 map upsampled twice
DFL_BINS = "dfl_bins"  # the name of the student's buffer of DFL bin values (int8 export leaves it float)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> SiLU, the unit of every YOLO branch."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.act(self.bn(self.conv(x)))
        return out


class DenseHead(nn.Module):
    """Per level: box distributions (``cv2``) and class logits (``cv3``) for every cell — the shape of
    Ultralytics' ``Detect`` head, for trunks built from scratch."""

    def __init__(self, channels: list[int], num_classes: int, reg_max: int, image_size: int) -> None:
        super().__init__()
        c2 = max(16, channels[0] // 4, reg_max * 4)
        c3 = max(channels[0], min(num_classes, 100))
        self.nc, self.reg_max = num_classes, reg_max
        self.cv2 = nn.ModuleList(
            nn.Sequential(ConvBN(c, c2), ConvBN(c2, c2), nn.Conv2d(c2, 4 * reg_max, 1)) for c in channels
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(ConvBN(c, c3), ConvBN(c3, c3), nn.Conv2d(c3, num_classes, 1)) for c in channels
        )
        with torch.no_grad():  # YOLO's prior: ~0.01 objects per cell spread over the classes
            for box, cls, stride in zip(self.cv2, self.cv3, STRIDES, strict=True):
                box_out: Any = box[-1]  # type: ignore[index]
                cls_out: Any = cls[-1]  # type: ignore[index]
                box_out.bias.fill_(2.0)
                cls_out.bias.fill_(math.log(5 / num_classes / (image_size / stride) ** 2))


class UltralyticsTrunk(nn.Module):
    """An Ultralytics detection model (built from its YAML ``spec``) as the student's trunk and head.

    ``layers`` are the model's layers but the last (backbone + neck, Ultralytics' modules with their ``f``
    "from" indices), ``head`` its ``Detect`` module, of which only the ``cv2``/``cv3`` branches are used (the
    student decodes boxes itself). Parameter names follow the model's: Ultralytics' ``model.{i}.*`` is
    ``layers.{i}.*`` here and the last layer's ``model.{n}.*`` is ``head.*`` (see :meth:`load_ultralytics`).
    """

    def __init__(self, spec: dict[str, Any], num_classes: int) -> None:
        super().__init__()
        from graphdistill._env import apply_offline_env
        from graphdistill._lazy import require

        apply_offline_env()
        require("ultralytics", purpose="a student started from an Ultralytics detector")
        from ultralytics.nn.tasks import DetectionModel

        cfg = copy.deepcopy(spec)
        cfg["nc"] = num_classes
        with contextlib.redirect_stdout(io.StringIO()):  # its build summary
            model = DetectionModel(cfg=cfg, ch=3, nc=num_classes, verbose=False)
        layers: list[Any] = list(model.model)  # type: ignore[arg-type]
        head = layers[-1]
        if type(head).__name__ != "Detect" or getattr(head, "one2one_cv2", None) is not None:
            raise ValueError(
                f"the detector's last layer is {type(head).__name__}: the student starts from a plain "
                "Ultralytics Detect head (one-to-many, DFL) only"
            )
        self.layers = nn.ModuleList(layers[:-1])
        self.head = head
        self.n_backbone = len(spec.get("backbone") or [])  # the YAML's backbone layers come first
        self.backbone_frozen = False
        self.save = sorted(int(i) for i in model.save)  # type: ignore[union-attr]
        self.outs = [int(i) for i in head.f]
        self.reg_max = int(head.reg_max)
        self.channels = [int(seq[0].conv.in_channels) for seq in head.cv2]
        strides = [int(s) for s in model.stride.tolist()]
        if tuple(strides) != STRIDES:
            raise ValueError(f"the detector's strides are {strides}; the student needs {list(STRIDES)}")

    def freeze(self, part: str) -> None:
        """``"backbone"``: train only the neck and the head; the backbone keeps the detector's weights and runs
        without gradients (half the trunk's training cost; a few hundred photos cannot improve what the
        detector learnt from COCO's 118 k). ``"trunk"``: the whole detector stays the teacher's. ``"none"``:
        everything trains."""
        if part not in ("none", "backbone", "trunk"):
            raise ValueError(f"freeze must be none, backbone or trunk, got {part!r}")
        self.backbone_frozen = part != "none"
        for i, m in enumerate([*self.layers, self.head]):
            for p in m.parameters():
                p.requires_grad_(part == "none" or (part == "backbone" and i >= self.n_backbone))

    def forward(self, x: Tensor) -> list[Tensor]:
        y: list[Tensor | None] = []
        for i, m in enumerate(self.layers):
            f: Any = m.f
            if f != -1:
                x = y[f] if isinstance(f, int) else [x if j == -1 else y[j] for j in f]  # type: ignore[assignment]
            if self.backbone_frozen and i < self.n_backbone and torch.is_grad_enabled():
                with torch.no_grad():
                    x = m(x)
            else:
                x = m(x)
            y.append(x if m.i in self.save else None)
        return [y[j] for j in self.outs]  # type: ignore[misc]

    def load_ultralytics(self, state_dict: dict[str, Tensor]) -> None:
        """Copy an Ultralytics ``DetectionModel.state_dict()`` (keys ``model.{i}.*``) into this trunk."""
        last = len(self.layers)
        mapped: dict[str, Tensor] = {}
        for key, value in state_dict.items():
            if not key.startswith("model."):
                continue
            index, _, rest = key[len("model.") :].partition(".")
            mapped[f"head.{rest}" if int(index) == last else f"layers.{index}.{rest}"] = value
        missing, unexpected = self.load_state_dict(mapped, strict=False)
        missing = [k for k in missing if not k.startswith("head.dfl")]
        if missing or unexpected:
            raise ValueError(
                f"the detector's weights do not fit its own architecture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )


class TimmTrunk(nn.Module):
    """A timm backbone (random init, strides 8/16/32) + a top-down FPN neck + :class:`DenseHead`."""

    def __init__(
        self, backbone: str, num_classes: int, reg_max: int, image_size: int, width: int = 64
    ) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(
            backbone, pretrained=False, features_only=True, out_indices=(-3, -2, -1)
        )
        info: Any = self.backbone.feature_info
        if list(info.reduction()) != list(STRIDES):
            raise ValueError(
                f"backbone {backbone!r} must give stride 8, 16 and 32 features, got {info.reduction()}"
            )
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in info.channels())
        self.smooth = nn.ModuleList(ConvBN(width, width) for _ in STRIDES)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.channels = [width] * 3
        self.reg_max = reg_max
        self.head = DenseHead(self.channels, num_classes, reg_max, image_size)

    def forward(self, x: Tensor) -> list[Tensor]:
        c3, c4, c5 = (lat(f) for lat, f in zip(self.lateral, self.backbone(x), strict=True))
        p5 = c5
        p4 = c4 + self.up(p5)
        p3 = c3 + self.up(p4)
        return [s(p) for s, p in zip(self.smooth, (p3, p4, p5), strict=True)]


class Proto(nn.Module):
    """Prototype masks: the stride-8 map -> ``num_masks`` maps at stride 4 (YOLACT / YOLO-seg)."""

    def __init__(self, c_in: int, channels: int, num_masks: int) -> None:
        super().__init__()
        self.cv1 = ConvBN(c_in, channels)
        self.up = nn.ConvTranspose2d(channels, channels, 2, 2, 0, bias=True)
        self.cv2 = ConvBN(channels, channels)
        self.cv3 = ConvBN(channels, num_masks, k=1)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.cv3(self.cv2(self.up(self.cv1(x))))
        return out


class CoefHead(nn.Module):
    """Per-cell mask coefficients for one level (one 3×3 conv unit, then a 1×1 to ``num_masks``)."""

    def __init__(self, c_in: int, num_masks: int) -> None:
        super().__init__()
        hidden = max(c_in // 4, num_masks)
        self.body = nn.Sequential(ConvBN(c_in, hidden), nn.Conv2d(hidden, num_masks, 1))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


def make_anchors(image_size: int) -> tuple[Tensor, Tensor]:
    """Cell centres in canvas pixels [A, 2] (x, y) and each cell's stride [A, 1], level by level (stride 8
    first), each level row-major: the order of the head's flattened outputs."""
    points, strides = [], []
    for s in STRIDES:
        g = image_size // s
        ys, xs = torch.meshgrid(
            torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij"
        )
        points.append(torch.stack([xs, ys], -1).view(-1, 2).add(0.5).mul(s))
        strides.append(torch.full((g * g, 1), float(s)))
    return torch.cat(points), torch.cat(strides)


def level_sizes(image_size: int) -> list[int]:
    """Cells per level (stride 8, 16, 32) of an ``image_size``² input."""
    return [(image_size // s) ** 2 for s in STRIDES]


def dfl_decode(dist: Tensor, anchors: Tensor, strides: Tensor, bins: Tensor) -> Tensor:
    """Box distributions [B,4·R,A] -> xyxy boxes in canvas pixels [B,A,4]: each side's distance from the cell
    centre is the expected value of its distribution over ``bins`` ([1, R]: 0..R-1) strides (Ultralytics' DFL). A
    last-dim softmax and a matmul with the bin values: both ops XNNPACK takes, where a softmax over dim 2 of a
    4-D tensor it does not."""
    b, _, a = dist.shape
    r = bins.shape[-1]
    probs = dist.view(b, 4, r, a).transpose(2, 3).softmax(-1)  # [B,4,A,R]
    # a linear layer whose weight is the bin values [1, R]: XNNPACK takes it (a matmul with a buffer it does
    # not), and int8 export leaves it float (quantize.FLOAT_ONLY, by the buffer's name)
    ltrb = F.linear(probs, bins).view(b, 4, a).transpose(1, 2) * strides  # [B,A,4] px
    return torch.cat([anchors - ltrb[..., :2], anchors + ltrb[..., 2:]], -1)
