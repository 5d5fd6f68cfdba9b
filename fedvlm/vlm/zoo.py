"""Tiny random-weight checkpoints of the Hugging Face VLM families fedvlm supports, built offline.

Each builder uses the family's real transformers config, model and processor classes (tiny sizes: a 2-layer LM of
width 64, a 2-layer vision tower, 32-64 px images) and a chat template that renders the family's published prompt
format, then saves model and processor with ``save_pretrained``. The directory loads through the same
``hf:<dir>`` path as a real checkpoint, so tests and benchmarks exercise the real loading, processing and training
code of every family without a model hub. The weights are random: these models learn, but know nothing.

``build(family, out)`` writes one; ``ZOO`` lists the families.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.08)
_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
             patch_size=8)
_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def chat_template(*, user: tuple[str, str], assistant: tuple[str, str], generation: str, image: str,
                  bos: str = "", system: tuple[str, str] | None = None, default_system: str = "",
                  images_first: bool = True) -> str:
    """A Jinja chat template rendering ``bos``, an optional system turn, then user and assistant turns as
    ``prefix + content + suffix``; an image item renders as ``image`` (before the text when ``images_first``, else
    in place); ``add_generation_prompt`` appends ``generation``. Content may be a string or a list of
    ``{"type": "image"|"text"}`` items, as transformers' processors pass it."""
    sys_pre, sys_post = system or ("", "")

    def items(kind: str) -> str:
        return ("{% for c in m['content'] %}{% if c['type'] == '" + kind + "' %}"
                + ("{{ '" + _escape(image) + "' }}" if kind == "image" else "{{ c['text'] }}")
                + "{% endif %}{% endfor %}")

    inline = ("{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '" + _escape(image) + "' }}"
              "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}")
    content = ("{% if m['content'] is string %}{{ m['content'] }}{% else %}"
               + (items("image") + items("text") if images_first else inline) + "{% endif %}")
    system_block = ""
    if system is not None:
        system_block = ("{% if messages[0]['role'] == 'system' %}{% set m = messages[0] %}{{ '" + _escape(sys_pre)
                        + "' }}" + content + "{{ '" + _escape(sys_post) + "' }}"
                        + ("{% else %}{{ '" + _escape(sys_pre + default_system + sys_post) + "' }}"
                           if default_system else "") + "{% endif %}")
    turns = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '" + _escape(user[0]) + "' }}" + content
             + "{{ '" + _escape(user[1]) + "' }}{% elif m['role'] == 'assistant' %}{{ '" + _escape(assistant[0])
             + "' }}" + content + "{{ '" + _escape(assistant[1]) + "' }}{% endif %}{% endfor %}")
    return ("{{ '" + _escape(bos) + "' }}" + system_block + turns
            + "{% if add_generation_prompt %}{{ '" + _escape(generation) + "' }}{% endif %}")


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def _tokenizer(*, special: dict[str, str], extra: dict[str, str] | None = None, added: tuple[str, ...] = (),
               eos: str = "</s>", bos: str | None = "<s>", pad: str = "<pad>"):
    """The project's offline byte-level BPE (fedvlm.vlm.tokenizer) with a family's special tokens added;
    ``extra`` become named special tokens (``tokenizer.<name>`` and ``tokenizer.<name>_id``), as the family's
    processor expects them on its tokenizer."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from fedvlm.vlm.tokenizer import build_tokenizer

    backend = build_tokenizer(320).backend_tokenizer
    tokens = [t for t in (*special.values(), *(extra or {}).values(), *added, eos, bos, pad) if t]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(tokens)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=pad, unk_token="<unk>", bos_token=bos,
                                   eos_token=eos, extra_special_tokens=dict(extra or {}), model_max_length=4096)


def _ids(tok, **names: str) -> dict[str, int]:
    return {key: tok.convert_tokens_to_ids(token) for key, token in names.items()}


def _lm(tok, model_type: str, **extra) -> dict:
    return {**_TEXT, "model_type": model_type, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, **extra}


# ---- the families ----------------------------------------------------------------------------------------------
def _llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = _tokenizer(special={"image": "<image>"})
    template = chat_template(user=("USER: ", " "), assistant=("ASSISTANT: ", " "), generation="ASSISTANT:",
                             image="<image>\n")
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    config = LlavaConfig(vision_config={**_CLIP, "model_type": "clip_vision_model"}, text_config=_lm(tok, "llama"),
                         image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=16)
    return LlavaForConditionalGeneration(config), processor


def _llava_next():
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = _tokenizer(special={"image": "<image>"})
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    template = chat_template(user=("[INST] ", " [/INST]"), assistant=(" ", "</s>"), generation="", image="<image>\n",
                             bos="<s>")
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                   image_grid_pinpoints=pinpoints, image_mean=_MEAN, image_std=_STD),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=template)
    config = LlavaNextConfig(vision_config={**_CLIP, "model_type": "clip_vision_model"},
                             text_config=_lm(tok, "mistral"), image_grid_pinpoints=pinpoints,
                             image_token_index=tok.convert_tokens_to_ids("<image>"))
    return LlavaNextForConditionalGeneration(config), processor


def _chatml_tokenizer(extra_specials: dict[str, str], **kw):
    return _tokenizer(special=extra_specials, added=("<|im_start|>",), eos="<|im_end|>", bos=None,
                      pad="<|endoftext|>", **kw)


_CHATML = dict(user=("<|im_start|>user\n", "<|im_end|>\n"), assistant=("<|im_start|>assistant\n", "<|im_end|>\n"),
               generation="<|im_start|>assistant\n", system=("<|im_start|>system\n", "<|im_end|>\n"))


def _llava_onevision():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from fedvlm.vlm.processors import image_only

    tok = _chatml_tokenizer({"image": "<image>", "video": "<video>"})
    pinpoints = [[32, 32], [32, 64], [64, 32]]
    processor = image_only(LlavaOnevisionProcessor)(
        image_processor=LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                        image_grid_pinpoints=pinpoints),
        tokenizer=tok, vision_feature_select_strategy="full", num_image_tokens=16,
        chat_template=chat_template(image="<image>\n", **_CHATML))
    config = LlavaOnevisionConfig(
        vision_config={**_CLIP, "model_type": "siglip_vision_model"}, text_config=_lm(tok, "qwen2"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
        **{k: v for k, v in _ids(tok, image_token_index="<image>", video_token_index="<video>").items()})
    return LlavaOnevisionForConditionalGeneration(config), processor


_QWEN_SPECIALS = {"image": "<|image_pad|>", "video": "<|video_pad|>", "start": "<|vision_start|>",
                  "end": "<|vision_end|>"}
_QWEN_VISION_ITEM = "<|vision_start|><|image_pad|><|vision_end|>"
_MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3]}


def _qwen_processor(cls, default_system: str = ""):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from fedvlm.vlm.processors import image_only

    tok = _chatml_tokenizer(_QWEN_SPECIALS)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=32 * 32, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                               temporal_patch_size=2, image_mean=_MEAN, image_std=_STD)
    template = chat_template(image=_QWEN_VISION_ITEM, default_system=default_system, **_CHATML)
    return tok, image_only(cls)(image_processor=image_processor, tokenizer=tok, chat_template=template)


def _qwen_ids(tok) -> dict[str, int]:
    return _ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok, processor = _qwen_processor(Qwen2VLProcessor, default_system="You are a helpful assistant.")
    config = Qwen2VLConfig(
        text_config=_lm(tok, "qwen2_vl_text", rope_parameters=_MROPE),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2), **_qwen_ids(tok))
    return Qwen2VLForConditionalGeneration(config), processor


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok, processor = _qwen_processor(Qwen2_5_VLProcessor, default_system="You are a helpful assistant.")
    config = Qwen2_5_VLConfig(
        text_config=_lm(tok, "qwen2_5_vl_text", rope_parameters=_MROPE),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=16), **_qwen_ids(tok))
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok, processor = _qwen_processor(Qwen3VLProcessor)
    config = Qwen3VLConfig(
        text_config=_lm(tok, "qwen3_vl_text", head_dim=16, rope_parameters={**_MROPE, "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]), **_qwen_ids(tok))
    return Qwen3VLForConditionalGeneration(config), processor


def _qwen3_5():
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor

    tok, processor = _qwen_processor(Qwen3VLProcessor)
    config = Qwen3_5Config(
        text_config=_lm(tok, "qwen3_5_text", head_dim=16, layer_types=["linear_attention", "full_attention"],
                        linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                        linear_num_value_heads=4,
                        rope_parameters={**_MROPE, "mrope_interleaved": True, "partial_rotary_factor": 1.0}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64),
        **_qwen_ids(tok))
    return Qwen3_5ForConditionalGeneration(config), processor


_IDEFICS_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8)


def _idefics_like(processor_cls, image_processor_cls, config_cls, model_cls, bos: str, image_only_processor: bool):
    from fedvlm.vlm.processors import image_only

    specials = {"fake": "<fake_token_around_image>", "image": "<image>", "eou": "<end_of_utterance>",
                "global": "<global-img>"}
    rows = tuple(f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6))
    tok = _tokenizer(special=specials, added=rows, eos="<end_of_utterance>", bos="<|begin_of_text|>"
                     if bos == "<|begin_of_text|>" else "<s>")
    template = chat_template(user=("User:", "<end_of_utterance>\n"), assistant=("Assistant: ", "<end_of_utterance>\n"),
                             generation="Assistant:", image="<image>", bos=bos)
    image_processor = image_processor_cls(do_image_splitting=False, size={"longest_edge": 32},
                                          max_image_size={"longest_edge": 32}, image_mean=_MEAN, image_std=_STD)
    cls = image_only(processor_cls) if image_only_processor else processor_cls
    processor = cls(image_processor=image_processor, tokenizer=tok, image_seq_len=4, chat_template=template)
    config = config_cls(vision_config=_IDEFICS_VISION, text_config=_lm(tok, "llama"), scale_factor=2,
                        image_token_id=tok.convert_tokens_to_ids("<image>"))
    return model_cls(config), processor


def _idefics3():
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return _idefics_like(Idefics3Processor, Idefics3ImageProcessorPil, Idefics3Config,
                         Idefics3ForConditionalGeneration, bos="<|begin_of_text|>", image_only_processor=False)


def _smolvlm():
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return _idefics_like(SmolVLMProcessor, SmolVLMImageProcessorPil, SmolVLMConfig, SmolVLMForConditionalGeneration,
                         bos="<|im_start|>", image_only_processor=True)


def _paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = _tokenizer(special={"image": "<image>"}, extra={"image_token": "<image>"}, bos="<s>", eos="</s>")
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = PaliGemmaConfig(vision_config={**_CLIP, "model_type": "siglip_vision_model", "projection_dim": 64},
                             text_config=_lm(tok, "gemma", head_dim=16, num_key_value_heads=1),
                             image_token_index=tok.convert_tokens_to_ids("<image>"), projection_dim=64)
    return PaliGemmaForConditionalGeneration(config), processor


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(special={}, extra=extra, added=("<start_of_turn>",), eos="<end_of_turn>", bos="<bos>")
    template = chat_template(user=("<start_of_turn>user\n", "<end_of_turn>\n"),
                             assistant=("<start_of_turn>model\n", "<end_of_turn>\n"),
                             generation="<start_of_turn>model\n", image="<start_of_image>", bos="<bos>")
    processor = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                                tokenizer=tok, image_seq_length=4, chat_template=template)
    config = Gemma3Config(
        text_config=_lm(tok, "gemma3_text", head_dim=16, sliding_window=64),
        vision_config={**_CLIP, "model_type": "siglip_vision_model"}, mm_tokens_per_image=4,
        **_ids(tok, image_token_index="<image_soft_token>", boi_token_index="<start_of_image>",
               eoi_token_index="<end_of_image>"))
    return Gemma3ForConditionalGeneration(config), processor


def _internvl():
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from fedvlm.vlm.processors import image_only

    extra = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = _chatml_tokenizer({}, extra=extra)
    processor = image_only(InternVLProcessor)(
        image_processor=GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False),
        tokenizer=tok, image_seq_length=4, chat_template=chat_template(image="<IMG_CONTEXT>\n", **_CHATML))
    config = InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=[32, 32], patch_size=[8, 8]),
        text_config=_lm(tok, "qwen2"), downsample_ratio=0.5,
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"))
    return InternVLForConditionalGeneration(config), processor


def _mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    tok = _tokenizer(special={"image": "<|image|>"}, added=("<|python_tag|>", "<|start_header_id|>",
                                                             "<|end_header_id|>"),
                     eos="<|eot_id|>", bos="<|begin_of_text|>")
    template = chat_template(user=("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
                             assistant=("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
                             generation="<|start_header_id|>assistant<|end_header_id|>\n\n", image="<|image|>",
                             bos="<|begin_of_text|>")
    processor = MllamaProcessor(
        image_processor=MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=4,
                                                image_mean=_MEAN, image_std=_STD),
        tokenizer=tok, chat_template=template)
    config = MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=4, image_size=32, patch_size=8, max_num_tiles=4, vision_output_dim=64,
                           intermediate_layers_indices=[0]),
        text_config={**_lm(tok, "mllama_text_model"), "cross_attention_layers": [1], "rope_scaling": None},
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    return MllamaForConditionalGeneration(config), processor


@dataclass(frozen=True)
class ZooEntry:
    """One tiny checkpoint: its family (``config.model_type``) and builder returning ``(model, processor)``."""

    family: str
    build: Callable[[], tuple]


ZOO: dict[str, ZooEntry] = {e.family: e for e in (
    ZooEntry("llava", _llava),
    ZooEntry("llava_next", _llava_next),
    ZooEntry("llava_onevision", _llava_onevision),
    ZooEntry("qwen2_vl", _qwen2_vl),
    ZooEntry("qwen2_5_vl", _qwen2_5_vl),
    ZooEntry("qwen3_vl", _qwen3_vl),
    ZooEntry("qwen3_5", _qwen3_5),
    ZooEntry("idefics3", _idefics3),
    ZooEntry("smolvlm", _smolvlm),
    ZooEntry("paligemma", _paligemma),
    ZooEntry("gemma3", _gemma3),
    ZooEntry("internvl", _internvl),
    ZooEntry("mllama", _mllama),
)}


def build(family: str, out: Path, seed: int = 0) -> Path:
    """Build the tiny ``family`` checkpoint (seeded: deterministic weights) and save model + processor to ``out``."""
    import torch

    try:
        entry = ZOO[family]
    except KeyError:
        raise ValueError(f"no tiny checkpoint for {family!r} (known: {', '.join(ZOO)})") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = entry.build()
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("built tiny %s checkpoint at %s", family, out)
    return out
