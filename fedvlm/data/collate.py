"""Turn examples into model batches with the model's own processor.

Every family is prompted its own way (``fedvlm.vlm.families``):

- ``chat``: the conversation (images as ``{"type": "image"}`` items of the user turn they belong to, several per example
  allowed) is rendered by the checkpoint's chat template (or the family's fallback template) and encoded by the
  checkpoint's processor, which expands the image placeholders and returns every input the model needs
  (``image_grid_thw``, ``image_sizes``, ``pixel_attention_mask``, ``token_type_ids``, ``cross_attention_mask``...). The
  labels cover the assistant turns only: each assistant turn's text span is where the template's rendering with the
  turn grows from the rendering that ends at the generation prompt; the span's tokens are found through the
  tokenizer's offsets and the processor's ``text_replacement_offsets`` (where the placeholders were expanded), or,
  for processors that do not report those, by encoding the prefixes. A turn whose span holds no stop token (the
  tokenizer's eos or the model's ``generation_config`` eos tokens) gets the eos token appended inside the span, so
  every model learns to stop. The chat templates' ``{% generation %}`` markers (``return_assistant_tokens_mask``)
  would give the same spans but few templates carry them.
- ``prefix_suffix`` (PaliGemma): the processor builds input, ``token_type_ids`` and labels from ``text`` (the question)
  and ``suffix`` (the answer). Single-turn only.
- ``fuyu``: built by fedvlm (``fedvlm.vlm.fuyu_inputs``); the answer is ``" " + answer + eos``.

Examples are encoded one at a time (each its own processor call, leading batch dimension 1) and kept by
``BatchBuilder`` up to a memory budget, so a training step only pads and concatenates tensors: sequence inputs are
padded along the sequence (right for training, left for generation), every other input is concatenated along its
first dimension with its other dimensions zero-padded to the largest (the layout processors use when they batch).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedvlm.data.llava_json import Example
from fedvlm.vlm.families import FUYU, PREFIX_SUFFIX, Family, family_of

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Processor outputs aligned with the token sequence (dimension 1), and what pads them.
SEQUENCE_PAD = {"attention_mask": 0, "labels": IGNORE_INDEX, "token_type_ids": 0, "mm_token_type_ids": 0,
                "cross_attention_mask": 0}
# Processor outputs that describe the encoding, not model inputs.
METADATA_KEYS = frozenset({"offset_mapping", "text_replacement_offsets"})
CACHE_ENV = "FEDVLM_ENCODE_CACHE_MB"
DEFAULT_CACHE_MB = 2048


class CollateError(ValueError):
    """The processor or chat template of a checkpoint cannot encode an example as its family requires."""


@dataclass(frozen=True)
class Encoder:
    """How one model's examples are encoded: its processor, family row, the inputs its ``forward`` accepts, and the
    tokens that end an answer (the tokenizer's eos and the model's ``generation_config`` eos tokens)."""

    processor: object
    family: Family
    model_inputs: frozenset[str]
    stop_tokens: tuple[str, ...]

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end an answer (for ``generate``)."""
        return sorted({self.tokenizer.convert_tokens_to_ids(t) for t in self.stop_tokens})

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def training(self, example: Example) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels`` (assistant turns only) and every other processor output the
        model accepts, for one example (batch dimension 1)."""
        if self.family.prompt == FUYU:
            return self._fuyu(example, train=True)
        if self.family.prompt == PREFIX_SUFFIX:
            return self._prefix_suffix(example, train=True)
        return self._chat_training(example)

    def generation(self, example: Example) -> dict[str, torch.Tensor]:
        """The model inputs that ask the example's first question (ending at the generation prompt)."""
        if self.family.prompt == FUYU:
            return self._fuyu(example, train=False)
        if self.family.prompt == PREFIX_SUFFIX:
            return self._prefix_suffix(example, train=False)
        messages = conversation(example, turns=1, answers=False)
        prompt = self.render(messages, add_generation_prompt=True)
        return self._model_inputs(self._encode(prompt, _images(example, upto_turn=0)))

    # ---- chat ----------------------------------------------------------------------------------------------------
    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The conversation as the checkpoint's chat template (or the family's fallback) renders it."""
        template = getattr(self.processor, "chat_template", None) or self.family.fallback_template
        if not template:
            raise CollateError("the checkpoint has no chat template and its family names no fallback template")
        return self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _chat_training(self, example: Example) -> dict[str, torch.Tensor]:
        messages = conversation(example, turns=len(example.exchanges), answers=True)
        text = self.render(messages, add_generation_prompt=False)
        spans: list[tuple[int, int]] = []
        for turn in range(len(example.exchanges)):
            prefix = self.render(messages[: 2 * turn + 1], add_generation_prompt=True)
            upto = self.render(messages[: 2 * turn + 2], add_generation_prompt=False)
            if not (upto.startswith(prefix) and text.startswith(upto)):
                raise CollateError(f"record {example.id!r}: the chat template's rendering of turn {turn + 1} does not "
                                   "extend the rendering before it, so the assistant answer cannot be located")
            spans.append((len(prefix), len(upto)))
        text, spans = self._end_answers(text, spans)
        images = _images(example)
        encoded = self._encode(text, images, offsets=True)
        if "text_replacement_offsets" in encoded and "offset_mapping" in encoded:
            mask = _span_mask(encoded, spans)
        else:
            mask = self._span_mask_by_prefixes(example, text, spans, encoded["input_ids"][0])
        labels = encoded["input_ids"].clone()
        labels[0, ~mask] = IGNORE_INDEX
        inputs = self._model_inputs(encoded)
        inputs["labels"] = labels
        return inputs

    def _end_answers(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        """Trim trailing whitespace from each answer span; append the eos token where a span holds no stop token."""
        eos = self.tokenizer.eos_token
        out, new_spans, cursor, shift = [], [], 0, 0
        for start, end in spans:
            content_end = start + len(text[start:end].rstrip())
            out.append(text[cursor:content_end])
            added = ""
            if eos and not any(stop in text[start:content_end] for stop in self.stop_tokens):
                added = eos
                out.append(eos)
            new_spans.append((start + shift, content_end + shift + len(added)))
            shift += len(added)
            cursor = content_end
        out.append(text[cursor:])
        return "".join(out), new_spans

    def _span_mask_by_prefixes(self, example: Example, text: str, spans, input_ids: torch.Tensor) -> torch.Tensor:
        """Label mask from the token counts of the text before and up to each span (each encoded with the images it
        contains); checks that every prefix encodes to a prefix of the whole sequence."""
        mask = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for turn, (start, end) in enumerate(spans):
            images = _images(example, upto_turn=turn)
            bounds = []
            for cut in (start, end):
                ids = self._encode(text[:cut], images)["input_ids"][0]
                if not torch.equal(ids, input_ids[: ids.shape[0]]):
                    raise CollateError(f"record {example.id!r}: the processor encodes the text before answer "
                                       f"{turn + 1} differently inside the whole conversation; cannot place its labels")
                bounds.append(ids.shape[0])
            mask[bounds[0]: bounds[1]] = True
        return mask

    # ---- prefix + suffix (PaliGemma) ----------------------------------------------------------------------------
    def _prefix_suffix(self, example: Example, train: bool) -> dict[str, torch.Tensor]:
        if len(example.exchanges) > 1:
            raise CollateError(f"record {example.id!r}: this family is prompted with one question and one answer; "
                               f"the record has {len(example.exchanges)} exchanges")
        images = _images(example)
        token = getattr(self.processor, "image_token", "<image>")
        kwargs = {"suffix": [example.answer]} if train else {}
        encoded = self.processor(text=[token * len(images) + example.question], images=[images], return_tensors="pt",
                                 **kwargs)
        inputs = self._model_inputs(encoded)
        if train:
            inputs["labels"] = encoded["labels"].long()
        return inputs

    # ---- Fuyu --------------------------------------------------------------------------------------------------
    def _fuyu(self, example: Example, train: bool) -> dict[str, torch.Tensor]:
        from fedvlm.vlm.fuyu_inputs import fuyu_prompts

        images = _images(example)
        if len(images) != 1:
            raise CollateError(f"record {example.id!r}: Fuyu inputs take exactly one image, the record has "
                               f"{len(images)}")
        ids, patches = fuyu_prompts(self.processor, [example.question], images)
        sequence, labels = list(ids[0]), [IGNORE_INDEX] * len(ids[0])
        if train:
            answer = self.tokenizer(" " + example.answer, add_special_tokens=False)["input_ids"]
            answer.append(self.tokenizer.eos_token_id)
            sequence += answer
            labels += answer
        out = {"input_ids": torch.tensor([sequence]), "attention_mask": torch.ones(1, len(sequence), dtype=torch.long),
               "pixel_values": patches}
        if train:
            out["labels"] = torch.tensor([labels])
        return out

    # ---- shared --------------------------------------------------------------------------------------------------
    def _encode(self, text: str, images: list, offsets: bool = False):
        """One processor call; the tokenizer adds no special tokens when the rendering starts with bos (the
        template put it there), as ``ProcessorMixin.apply_chat_template`` does."""
        bos = self.tokenizer.bos_token
        kwargs = {"add_special_tokens": not (bos and text.startswith(bos))}
        if offsets:
            kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
        call = {"text": [text], "return_tensors": "pt", **kwargs}
        if images:
            call["images"] = [images]
        try:
            return self.processor(**call)
        except TypeError:
            if not offsets:
                raise
            return self._encode(text, images)  # a processor with its own __call__ that takes no offsets arguments

    def _model_inputs(self, encoded) -> dict[str, torch.Tensor]:
        """The processor outputs the model's ``forward`` accepts; a missing input the family needs is an error."""
        missing = [k for k in self.family.extra_inputs if k not in encoded and k in self.model_inputs]
        if missing:
            raise CollateError(f"the processor ({type(self.processor).__name__}) returned no {', '.join(missing)}, "
                               "which this model family needs")
        return {k: v for k, v in encoded.items()
                if k not in METADATA_KEYS and k != "labels" and k in self.model_inputs and isinstance(v, torch.Tensor)}


def encoder_for(model, processor) -> Encoder:
    """The ``Encoder`` of a loaded model (a ``PeftModel`` or its base) and its processor: the family row of its
    ``model_type``, the inputs its ``forward`` takes, and its stop tokens (tokenizer eos + generation eos ids)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(base.config.model_type, type(base).__name__)
    model_inputs = frozenset(inspect.signature(base.forward).parameters)
    tok = processor.tokenizer
    eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    stops = {tok.eos_token} if tok.eos_token else set()
    stops |= {t for t in tok.convert_ids_to_tokens(ids) if t}
    return Encoder(processor, family, model_inputs, tuple(sorted(stops)))


def conversation(example: Example, turns: int, answers: bool) -> list[dict]:
    """The first ``turns`` exchanges in the chat format processors take; each image is an ``{"type": "image"}`` item
    at the start of the user turn it belongs to. ``answers=False`` leaves out the last assistant turn."""
    messages: list[dict] = []
    counts = [0] * len(example.exchanges)
    for turn in example.image_turns:
        counts[turn] += 1
    for index, (question, answer) in enumerate(example.exchanges[:turns]):
        content = [{"type": "image"} for _ in range(counts[index])] + [{"type": "text", "text": question}]
        messages.append({"role": "user", "content": content})
        if answers or index < turns - 1:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _images(example: Example, upto_turn: int | None = None) -> list:
    """The example's images (RGB, decoded now) of turns ``<= upto_turn`` (all when None)."""
    from PIL import Image

    out = []
    for path, turn in zip(example.images, example.image_turns, strict=True):
        if upto_turn is None or turn <= upto_turn:
            with Image.open(path) as img:
                out.append(img.convert("RGB"))
    return out


def _span_mask(encoded, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Tokens whose text starts inside an answer span, with the spans moved by the placeholder expansions before
    them (an answer never contains a placeholder)."""
    replacements = encoded["text_replacement_offsets"][0]
    shifted = []
    for start, end in spans:
        shift = sum((r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
                    for r in replacements if r["span"][1] <= start)
        shifted.append((start + shift, end + shift))
    offsets = encoded["offset_mapping"][0]
    mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
    for i, (a, b) in enumerate(offsets.tolist()):
        mask[i] = b > a and any(s <= a < e for s, e in shifted)
    return mask


def collate(encoded: Sequence[dict[str, torch.Tensor]], pad_id: int, padding_side: str = "right"
            ) -> dict[str, torch.Tensor]:
    """One batch from per-example encodings (each with batch dimension 1): sequence inputs padded along dimension 1 on
    ``padding_side`` (``input_ids`` with ``pad_id``, labels with -100, masks with 0), every other tensor concatenated
    along dimension 0 with its other dimensions zero-padded to the largest."""
    keys = list(encoded[0])
    if any(list(e) != keys for e in encoded):
        raise CollateError("examples of one batch were encoded with different inputs")
    batch = {}
    for key in keys:
        tensors = [e[key] for e in encoded]
        if key == "input_ids" or key in SEQUENCE_PAD:
            value = pad_id if key == "input_ids" else SEQUENCE_PAD[key]
            batch[key] = torch.cat([_pad_sequence(t, tensors, value, padding_side) for t in tensors])
        else:
            batch[key] = torch.cat([_pad_trailing(t, tensors) for t in tensors])
    return batch


def _pad_sequence(t: torch.Tensor, all_: list[torch.Tensor], value: int, side: str) -> torch.Tensor:
    width = max(x.shape[1] for x in all_)
    t = _pad_trailing(t, all_, from_dim=2)
    if t.shape[1] == width:
        return t
    pad = torch.full((t.shape[0], width - t.shape[1], *t.shape[2:]), value, dtype=t.dtype)
    return torch.cat([t, pad] if side == "right" else [pad, t], dim=1)


def _pad_trailing(t: torch.Tensor, all_: list[torch.Tensor], from_dim: int = 1) -> torch.Tensor:
    """Zero-pad dimensions ``>= from_dim`` of ``t`` to the largest size among ``all_`` (at the end)."""
    target = [max(x.shape[d] for x in all_) for d in range(t.dim())]
    if all(t.shape[d] == target[d] for d in range(from_dim, t.dim())):
        return t
    out = t.new_zeros((*t.shape[:from_dim], *target[from_dim:]))
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


class BatchBuilder:
    """Batches of one model's examples: each example is encoded once (``Encoder``) and kept while the cache is under
    its budget (``$FEDVLM_ENCODE_CACHE_MB``, default 2048 MiB), so a step re-encodes only what did not fit."""

    def __init__(self, encoder: Encoder, cache_mb: float | None = None) -> None:
        self.encoder = encoder
        if cache_mb is None:
            raw = os.environ.get(CACHE_ENV, str(DEFAULT_CACHE_MB))
            try:
                cache_mb = float(raw)
            except ValueError:
                raise ValueError(f"{CACHE_ENV} must be a number of MiB, got {raw!r}") from None
        self.budget = int(cache_mb * (1 << 20))
        self.cached_bytes = 0
        self._cache: dict[tuple[str, Example], dict[str, torch.Tensor]] = {}

    def training(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """A training batch (right padded)."""
        return collate([self._get("train", ex) for ex in examples], self.encoder.pad_id, "right")

    def generation(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        """A generation batch (left padded, as ``generate`` needs)."""
        return collate([self._get("generate", ex) for ex in examples], self.encoder.pad_id, "left")

    def warm(self, examples: Sequence[Example], purpose: str = "train") -> int:
        """Encode ``examples`` ahead of use until the cache budget is spent (e.g. before a round's first step, or
        while a site waits for its first round); returns how many of them are cached now."""
        for example in examples:
            if self.cached_bytes >= self.budget:
                break
            self._get(purpose, example)
        return sum(1 for example in examples if (purpose, example) in self._cache)

    def _get(self, purpose: str, example: Example) -> dict[str, torch.Tensor]:
        key = (purpose, example)
        found = self._cache.get(key)
        if found is not None:
            return found
        encoded = self.encoder.training(example) if purpose == "train" else self.encoder.generation(example)
        size = sum(t.numel() * t.element_size() for t in encoded.values())
        if self.cached_bytes + size <= self.budget:
            self._cache[key] = encoded
            self.cached_bytes += size
        return encoded
