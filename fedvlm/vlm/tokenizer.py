"""An offline tokenizer for the built-in tiny presets.

A byte-level BPE (so any text can be encoded, nothing maps to ``<unk>``) trained with ``tokenizers`` on a small
generated corpus of prompts and answers. Training is deterministic: the same corpus and vocabulary size give the
same ``tokenizer.json`` bytes on every machine, which every site relies on to share one base model.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4.
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)

# A LLaVA-1.5-like template: "USER: <image>\n{question}\nASSISTANT:" then " {answer}</s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{{ '\\n' }}"
    "{% elif message['role'] == 'assistant' %}ASSISTANT:"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}"
    "</s>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_WORD_TEXT = (
    "what which how many is are the a an of in on this that image picture photo shown digit number "
    "class label answer yes no left right top bottom color shape object count there one two three four five "
    "six seven eight nine zero normal abnormal benign malignant cell tissue scan x-ray chest lesion "
    "describe question user assistant please"
)
_WORDS = _WORD_TEXT.split(" ")


def _corpus() -> Iterator[str]:
    """A fixed, ordered corpus; changing it changes the preset hash (see ``presets.RECIPE_VERSION``)."""
    for question in ("What digit is shown?", "Which digit is in the image?", "What number is this?"):
        for answer in range(10):
            yield f"USER: {IMAGE}\n{question}\nASSISTANT: {answer}{EOS}"
    for i in range(200):
        yield f"{i} {i % 10} {i * 7 % 97}"
    for i, word in enumerate(_WORDS):
        yield f"{word} {word.capitalize()} {word.upper()} {_WORDS[(i * 5) % len(_WORDS)]}?"


def build_tokenizer(vocab_size: int = 320):
    """Train and return a ``PreTrainedTokenizerFast`` with the special tokens above at ids 0..4.

    Guarantees: deterministic; ``<image>`` and ``</s>`` are single tokens; decoding round-trips any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        padding_side="left",
        model_max_length=256,
    )
    for i, token in enumerate(SPECIAL_TOKENS):
        if fast.convert_tokens_to_ids(token) != i:  # pragma: no cover - guards the id contract above
            raise RuntimeError(f"special token {token!r} got id {fast.convert_tokens_to_ids(token)}, expected {i}")
    logger.debug("built tokenizer: %d tokens", len(fast))
    return fast
