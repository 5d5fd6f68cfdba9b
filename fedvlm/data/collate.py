"""Turn examples into model batches: chat prompt, ``<image>`` expansion by the processor, padding, label masks.

Training sequences are ``prompt + " " + answer + eos``; only the answer and eos tokens carry a loss (the prompt,
image tokens and padding are labelled -100). A multi-turn conversation continues with each later turn's user text
(as the chat template renders it after the previous assistant turn) and ``" " + answer + eos``; every assistant
answer carries a loss, every user turn is masked. Prompt and answer are tokenized separately and concatenated, so the
prompt ids seen in training are exactly the ones given to ``generate`` at evaluation.
"""

from __future__ import annotations

import torch

from fedvlm.data.llava_json import Example

IGNORE_INDEX = -100
FALLBACK_TEMPLATE = "USER: <image>\n{question}\nASSISTANT:"
FALLBACK_FOLLOW_UP = "USER: {question}\nASSISTANT:"


def prompt_text(processor, question: str) -> str:
    """The generation prompt for one question, through the processor's chat template when it has one."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", "<image>")
    return FALLBACK_TEMPLATE.format(question=question).replace("<image>", image_token)


def follow_up_text(processor, history: tuple[tuple[str, str], ...], question: str) -> str:
    """The text between the previous assistant answer's eos and the next answer: the next user turn and the
    assistant header, as the chat template renders them (the difference of two renderings)."""
    if getattr(processor, "chat_template", None):
        messages = []
        for index, (q, a) in enumerate(history):
            content = [{"type": "text", "text": q}]
            if index == 0:
                content.insert(0, {"type": "image"})
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
        before = processor.apply_chat_template(messages, tokenize=False)
        after = processor.apply_chat_template(
            messages + [{"role": "user", "content": [{"type": "text", "text": question}]}],
            add_generation_prompt=True, tokenize=False)
        if after.startswith(before):
            return after[len(before):]
    return FALLBACK_FOLLOW_UP.format(question=question)


def _load_images(examples: list[Example]):
    from PIL import Image

    images = []
    for example in examples:
        with Image.open(example.image) as img:
            images.append(img.convert("RGB"))
    return images


def _encode_prompts(processor, examples: list[Example]) -> tuple[list[list[int]], torch.Tensor]:
    from fedvlm.vlm.fuyu_inputs import fuyu_prompts, is_fuyu

    if is_fuyu(processor):  # encoder-free hub model whose processor cannot run here (see fedvlm.vlm.fuyu_inputs)
        return fuyu_prompts(processor, [ex.question for ex in examples], _load_images(examples))
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
        sequence, label = list(prompt), [IGNORE_INDEX] * len(prompt)
        exchanges = ex.exchanges
        for turn, (question, answer_text) in enumerate(exchanges):
            if turn > 0:
                follow = tok(follow_up_text(processor, exchanges[:turn], question), add_special_tokens=False)
                sequence += follow["input_ids"]
                label += [IGNORE_INDEX] * len(follow["input_ids"])
            answer = tok(" " + answer_text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            sequence += answer
            label += answer
        sequences.append(sequence)
        labels.append(label)
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
