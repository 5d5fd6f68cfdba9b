"""Turn examples into model batches: chat prompt, ``<image>`` expansion by the processor, padding, label masks.

Training sequences are ``prompt + " " + answer + eos``; only the answer and eos tokens carry a loss (the prompt,
image tokens and padding are labelled -100). Prompt and answer are tokenized separately and concatenated, so the
prompt ids seen in training are exactly the ones given to ``generate`` at evaluation.
"""

from __future__ import annotations

import torch

from fedvlm.data.llava_json import Example

IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "USER: <image>\n{question}\nASSISTANT:"


def prompt_text(processor, question: str) -> str:
    """The generation prompt for one question, through the processor's chat template when it has one."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", "<image>")
    return FALLBACK_TEMPLATE.format(question=question).replace("<image>", image_token)


def _load_images(examples: list[Example]):
    from PIL import Image

    images = []
    for example in examples:
        with Image.open(example.image) as img:
            images.append(img.convert("RGB"))
    return images


def _encode_prompts(processor, examples: list[Example]) -> tuple[list[list[int]], torch.Tensor]:
    texts = [prompt_text(processor, ex.question) for ex in examples]
    enc = processor(text=texts, images=_load_images(examples), return_tensors="pt", padding=True)
    # Recover the unpadded prompt ids per example (the processor pads on the tokenizer's side).
    ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
    return ids, enc["pixel_values"]


def _pad_id(processor) -> int:
    tok = processor.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def training_batch(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` (right padded) and ``pixel_values`` for a training step."""
    tok = processor.tokenizer
    prompts, pixel_values = _encode_prompts(processor, examples)
    sequences, labels = [], []
    for prompt, ex in zip(prompts, examples, strict=True):
        answer = tok(" " + ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        sequences.append(prompt + answer)
        labels.append([IGNORE_INDEX] * len(prompt) + answer)
    width = max(len(s) for s in sequences)
    pad = _pad_id(processor)
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    label_ids = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, lab) in enumerate(zip(sequences, labels, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        label_ids[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": label_ids, "pixel_values": pixel_values}


def generation_batch(processor, examples: list[Example]) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (left padded, as ``generate`` needs) and ``pixel_values``."""
    prompts, pixel_values = _encode_prompts(processor, examples)
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), _pad_id(processor), dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        input_ids[i, width - len(prompt):] = torch.tensor(prompt)
        attention[i, width - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixel_values}
