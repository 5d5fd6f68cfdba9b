"""fedvlm's own small VLM classes, registered with the Hugging Face Auto classes.

One config/model pair, model type ``fedvlm_llava``, covers what the stock ``LlavaForConditionalGeneration`` cannot:

- **Connector kinds** (``config.connector``): ``linear`` (one ``nn.Linear``), ``mlp<N>x_gelu`` for any N >= 1
  (Linear, then N-1 times GELU + Linear, as in LLaVA's ``build_vision_projector``). The module keeps the stock
  name ``model.multi_modal_projector``, so PEFT ``modules_to_save`` and every tool that knows LLaVA find it.
- **Encoder-free** (``config.encoder_free = True``): no vision encoder. The image is cut into ``patch_size`` x
  ``patch_size`` patches which the connector (a linear patch embedding, Fuyu-style) maps straight into the
  language model's embedding space, one ``<image>`` token per patch. ``vision_config`` then only describes the
  patch grid (image_size, patch_size, num_channels); no vision module is built.

Everything else (the placeholder scatter, generation, caching, the loss) is inherited from LLaVA, so the processor is
a plain ``LlavaProcessor``. ``register()`` makes ``AutoConfig`` / ``AutoModelForImageTextToText`` /
``AutoProcessor`` resolve ``fedvlm_llava``; it runs when this module is imported (``fedvlm.vlm.loading`` does).
A third party loading an exported adapter on such a base needs ``import fedvlm.vlm.archs`` first.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import LlavaConfig
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import (
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)

MODEL_TYPE = "fedvlm_llava"
_MLP = re.compile(r"mlp(\d+)x_gelu")


def connector_depth(kind: str) -> int:
    """Number of linear layers of a connector kind; ``ValueError`` for an unknown kind."""
    if kind == "linear":
        return 1
    match = _MLP.fullmatch(kind)
    if match is None or int(match.group(1)) < 1:
        raise ValueError(f"unknown connector {kind!r} (known: linear, mlp<N>x_gelu with N >= 1, e.g. mlp2x_gelu)")
    return int(match.group(1))


def build_connector(kind: str, in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    """``linear`` -> one ``nn.Linear``; ``mlp<N>x_gelu`` -> ``nn.Sequential`` of N linears with GELU between."""
    depth = connector_depth(kind)
    if kind == "linear":
        return nn.Linear(in_features, out_features, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features, bias=bias)]
    return nn.Sequential(*layers)


class FedvlmLlavaConfig(LlavaConfig):
    """``LlavaConfig`` plus ``connector`` (kind, see module docstring) and ``encoder_free``."""

    model_type = MODEL_TYPE
    connector: str = "mlp2x_gelu"
    encoder_free: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        connector_depth(self.connector)  # validate early, with a clear message


class Patchify(nn.Module):
    """(B, C, H, W) -> (B, H/P * W/P, P*P*C), row-major patches; no parameters."""

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        b, c, h, w = pixel_values.shape
        x = pixel_values.reshape(b, c, h // p, p, w // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class FedvlmLlavaPreTrainedModel(LlavaPreTrainedModel):
    config_class = FedvlmLlavaConfig
    config: FedvlmLlavaConfig


class FedvlmLlavaModel(FedvlmLlavaPreTrainedModel, LlavaModel):
    def __init__(self, config: FedvlmLlavaConfig):
        FedvlmLlavaPreTrainedModel.__init__(self, config)
        from transformers import AutoModel

        vision = config.vision_config
        if config.encoder_free:
            self.vision_tower = None
            self.patchify = Patchify(vision.patch_size)
            in_features = vision.patch_size * vision.patch_size * vision.num_channels
        else:
            self.vision_tower = AutoModel.from_config(vision)
            layers = 1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
            in_features = vision.hidden_size * layers
        self.multi_modal_projector = build_connector(
            config.connector, in_features, config.text_config.hidden_size, bias=config.multimodal_projector_bias
        )
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_image_features(self, pixel_values: torch.Tensor, *args, **kwargs):
        if not self.config.encoder_free:
            return super().get_image_features(pixel_values, *args, **kwargs)
        features = self.multi_modal_projector(self.patchify(pixel_values))
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=list(features))


class FedvlmLlavaForConditionalGeneration(FedvlmLlavaPreTrainedModel, LlavaForConditionalGeneration):
    def __init__(self, config: FedvlmLlavaConfig):
        FedvlmLlavaPreTrainedModel.__init__(self, config)
        self.model = FedvlmLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


_registered = False


def register() -> None:
    """Register ``fedvlm_llava`` with AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, and its
    EfficientNet-Lite vision tower with AutoConfig and AutoModel (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaProcessor,
    )

    from fedvlm.vlm import efficientnet_lite

    efficientnet_lite.register()  # the pretrained presets' vision tower (model type fedvlm_efficientnet_lite)
    AutoConfig.register(MODEL_TYPE, FedvlmLlavaConfig, exist_ok=True)
    AutoModel.register(FedvlmLlavaConfig, FedvlmLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(FedvlmLlavaConfig, FedvlmLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(FedvlmLlavaConfig, LlavaProcessor, exist_ok=True)
    _registered = True


register()
