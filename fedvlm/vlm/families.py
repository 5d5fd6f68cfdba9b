"""The one table of Hugging Face VLM families fedvlm knows: where the parts of each live, how it is prompted, and
which extra processor outputs its ``forward`` needs. Adding a family is one row of ``FAMILIES``.

A row is looked up by ``config.model_type``. Its fields:

- ``language_model`` / ``connector`` / ``vision_tower``: dotted module paths as in ``model.named_modules()`` of
  transformers 5. LoRA targets only linear layers under ``language_model``; the connector (plus ``extra_connectors``,
  e.g. Qwen3-VL's deepstack mergers) is what F-C trains; the vision tower stays frozen (None: encoder-free).
- ``prompt``: how a batch is built (fedvlm.data.collate):
  ``"chat"``: the checkpoint's own chat template renders the conversation and its processor encodes text and images;
  ``"prefix_suffix"``: the processor takes the question as ``text`` and the answer as ``suffix`` and builds the
  labels itself (PaliGemma, which has no chat template); ``"fuyu"``: built by fedvlm (fedvlm.vlm.fuyu_inputs), as
  Fuyu's processor cannot run here.
- ``fallback_template``: a Jinja chat template for checkpoints of a ``"chat"`` family that ship none (base models).
- ``extra_inputs``: processor outputs besides ``input_ids`` / ``attention_mask`` / ``pixel_values`` that the model
  needs; the collate passes every processor output the model's ``forward`` accepts, and a missing one of these is a
  clear error instead of a failure deep inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass

CHAT, PREFIX_SUFFIX, FUYU = "chat", "prefix_suffix", "fuyu"
PROMPT_FORMATS = (CHAT, PREFIX_SUFFIX, FUYU)

# LLaVA-1.5's published format ("USER: <image>\n{question} ASSISTANT: {answer}</s>"), for LLaVA-style base
# checkpoints without a chat template.
LLAVA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {% elif m['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if m['content'] is string %}{{ m['content'] }} {% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One row of ``FAMILIES`` (see the module docstring for each field)."""

    language_model: str
    connector: str
    vision_tower: str | None
    prompt: str = CHAT
    fallback_template: str | None = None
    extra_inputs: tuple[str, ...] = ()
    extra_connectors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_FORMATS:  # pragma: no cover - a table error, caught by the table test
            raise ValueError(f"prompt must be one of {PROMPT_FORMATS}, got {self.prompt!r}")

    @property
    def connectors(self) -> tuple[str, ...]:
        """Every module the connector consists of (the first is the main projector)."""
        return (self.connector, *self.extra_connectors)


_LLAVA = Family("model.language_model", "model.multi_modal_projector", "model.vision_tower",
                fallback_template=LLAVA_TEMPLATE)
_QWEN_VL = Family("model.language_model", "model.visual.merger", "model.visual", extra_inputs=("image_grid_thw",))
_QWEN3_VL = Family("model.language_model", "model.visual.merger", "model.visual", extra_inputs=("image_grid_thw",),
                   extra_connectors=("model.visual.deepstack_merger_list",))
_IDEFICS = Family("model.text_model", "model.connector", "model.vision_model", extra_inputs=("pixel_attention_mask",))

# config.model_type -> family.
FAMILIES: dict[str, Family] = {
    "llava": _LLAVA,
    "fedvlm_llava": _LLAVA,  # fedvlm's own connector kinds and encoder-free variant (fedvlm.vlm.archs)
    "llava_next": Family("model.language_model", "model.multi_modal_projector", "model.vision_tower",
                         fallback_template=LLAVA_TEMPLATE, extra_inputs=("image_sizes",)),
    "llava_onevision": Family("model.language_model", "model.multi_modal_projector", "model.vision_tower",
                              extra_inputs=("image_sizes",)),
    "qwen2_vl": _QWEN_VL,
    "qwen2_5_vl": _QWEN_VL,
    "qwen3_vl": _QWEN3_VL,
    "qwen3_5": _QWEN3_VL,  # Qwen3.5: the Qwen3-VL processor and vision tower, hybrid linear-attention LM
    "idefics3": _IDEFICS,
    "smolvlm": _IDEFICS,
    "paligemma": Family("model.language_model", "model.multi_modal_projector", "model.vision_tower",
                        prompt=PREFIX_SUFFIX, extra_inputs=("token_type_ids",)),
    "gemma3": Family("model.language_model", "model.multi_modal_projector", "model.vision_tower",
                     extra_inputs=("token_type_ids",)),
    "internvl": Family("model.language_model", "model.multi_modal_projector", "model.vision_tower"),
    "mllama": Family("model.language_model", "model.multi_modal_projector", "model.vision_model",
                     extra_inputs=("cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask")),
    "fuyu": Family("model.language_model", "model.vision_embed_tokens", None, prompt=FUYU),
}


class UnknownFamilyError(ValueError):
    """The checkpoint's ``model_type`` has no row in ``FAMILIES``."""


def family_of(model_type: str | None, what: str = "") -> Family:
    """The row for ``model_type``; ``UnknownFamilyError`` with one line naming the known families and the row to add."""
    family = FAMILIES.get(model_type or "")
    if family is None:
        label = f" ({what})" if what else ""
        raise UnknownFamilyError(
            f"task.model: model type {model_type!r}{label} is not a VLM family fedvlm knows (known: "
            f"{', '.join(sorted(FAMILIES))}); add one row to fedvlm.vlm.families.FAMILIES naming its language model, "
            "connector and vision tower modules, prompt format and extra processor inputs")
    return family
