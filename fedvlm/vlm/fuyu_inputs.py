"""Model inputs for Fuyu (``FuyuForCausalLM``, encoder-free, hub model type ``fuyu``).

``FuyuProcessor.__call__`` cannot be used here: its torch image processor needs torchvision (not installed) and the
PIL one fails in ``patchify_image`` on transformers 5.23 (numpy ``transpose`` called on a torch tensor). The layout
is simple, so it is built directly, as ``FuyuProcessor`` documents it:

    ids    = (|SPEAKER| x patches_per_row, |NEWLINE|) x rows, <s>, question tokens, <0x04> (begin of answer)
    pixels = (num_patches, patch_h * patch_w * channels) patches, row-major, channels last

Images are resized to the image processor's ``size`` and normalized with its mean/std.
"""

from __future__ import annotations

import numpy as np
import torch

BOA = "<0x04>"


def is_fuyu(processor) -> bool:
    return type(processor).__name__ == "FuyuProcessor"


def _size(value, key: str) -> int:
    return int(value[key] if isinstance(value, dict) else getattr(value, key))


def fuyu_prompts(processor, questions: list[str], images) -> tuple[list[list[int]], torch.Tensor]:
    """Per-example prompt ids (unpadded) and the stacked patches ``(B, num_patches, P*P*C)``."""
    tok = processor.tokenizer
    ip = processor.image_processor
    height, width = _size(ip.size, "height"), _size(ip.size, "width")
    ph, pw = _size(ip.patch_size, "height"), _size(ip.patch_size, "width")
    mean = torch.tensor(ip.image_mean, dtype=torch.float32).expand(3).reshape(3, 1, 1)  # scalar or per channel
    std = torch.tensor(ip.image_std, dtype=torch.float32).expand(3).reshape(3, 1, 1)
    rows, cols = height // ph, width // pw
    speaker, newline = tok.convert_tokens_to_ids("|SPEAKER|"), tok.convert_tokens_to_ids("|NEWLINE|")
    boa = tok.convert_tokens_to_ids(BOA)
    image_ids = ([speaker] * cols + [newline]) * rows
    ids, patches = [], []
    for question, image in zip(questions, images, strict=True):
        text = tok(question, add_special_tokens=False)["input_ids"]
        ids.append(image_ids + [tok.bos_token_id] + text + [boa])
        rgb = np.asarray(image.convert("RGB").resize((width, height)), dtype=np.float32)
        pixels = torch.from_numpy(rgb.copy()).permute(2, 0, 1) / 255.0
        pixels = (pixels - mean) / std
        x = pixels.reshape(3, rows, ph, cols, pw).permute(1, 3, 2, 4, 0)
        patches.append(x.reshape(rows * cols, ph * pw * 3))
    return ids, torch.stack(patches)
