"""Load a checkpoint's processor, also where its video processor cannot be built.

Several families' processors (Qwen2-VL and later, SmolVLM, LLaVA-OneVision, InternVL) hold a video processor that
transformers builds with torchvision. torchvision's PyPI wheels do not import beside a CPU-only torch (``operator
torchvision::nms does not exist``), and then ``AutoProcessor.from_pretrained`` fails for the whole processor although
fedvlm never passes videos. ``image_only(cls)`` is the same processor class without the video sub-processor: its
``__init__`` omits ``video_processor``, so ``ProcessorMixin`` (which takes the sub-processors from the ``__init__``
signature) neither loads nor checks it; image processing, tokenisation and the chat template are the class's own.
The slow (PIL) image processors need no torchvision, and transformers picks them when torchvision is missing.
Where torchvision works (a GPU machine), the stock ``AutoProcessor`` path is used.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


@functools.cache
def image_only(cls: type) -> type:
    """``cls`` (a ``ProcessorMixin`` subclass with a ``video_processor``) without its video processor.

    The subclass keeps ``cls.__name__`` and every other ``__init__`` parameter by name (transformers reads the
    accepted init kwargs from the code object, so the ``__init__`` is generated with the real parameter list), so a
    processor saved from it is recorded (``processor_class``, init kwargs) exactly as the real class. ``ValueError``
    when ``cls`` lists its video processor before another sub-processor (the base class maps them by position).
    """
    attributes = cls.get_attributes()
    if "video_processor" not in attributes or attributes[-1] != "video_processor":
        raise ValueError(f"{cls.__name__} cannot be built without its video processor here (sub-processors "
                         f"{attributes}); install a torchvision that imports beside this torch")
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items() if name != "video_processor"]
    defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    header, call = [], []
    for p in params:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            header.append(f"**{p.name}")
            call.append(f"**{p.name}")
        elif p.kind is inspect.Parameter.VAR_POSITIONAL:
            raise ValueError(f"{cls.__name__}.__init__ takes *{p.name}: cannot drop its video processor")
        elif p.name == "self":
            header.append("self")
        else:
            header.append(f"{p.name}=_defaults[{p.name!r}]" if p.name in defaults else p.name)
            call.append(f"{p.name}={p.name}")
    source = (f"def __init__({', '.join(header)}):\n"
              f"    _cls.__init__(self, video_processor=None, {', '.join(call)})\n")
    namespace = {"_cls": cls, "_defaults": defaults}
    exec(source, namespace)  # noqa: S102 - generated from the class's own signature, no outside input
    return type(cls.__name__, (cls,), {"__init__": namespace["__init__"], "__module__": cls.__module__,
                                       "__doc__": f"{cls.__name__} without its video processor."})


def torchvision_available() -> bool:
    """True when torchvision imports (its PyPI wheels fail beside a CPU-only torch: see module docstring)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision  # noqa: F401
    except Exception:  # RuntimeError "operator torchvision::nms does not exist" and similar
        return False
    return True


def processor_class_name(path: str) -> str | None:
    """The ``processor_class`` recorded in a local checkpoint directory, or None if it records none."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.is_file():
            try:
                value = json.loads(file.read_text()).get("processor_class")
            except (OSError, ValueError):
                continue
            if value:
                return value
    return None


def load_processor(path: str, **kwargs):
    """The checkpoint's own processor (``AutoProcessor.from_pretrained(path, **kwargs)``); where torchvision is
    unavailable and the processor class has a video processor, the same class without it (``image_only``)."""
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import processor_class_from_name

    name = processor_class_name(path) if Path(path).is_dir() else None
    cls = processor_class_from_name(name) if name else _class_for_config(path, **kwargs)
    if cls is not None and "video_processor" in cls.get_attributes() and not torchvision_available():
        logger.info("torchvision is unavailable: loading %s without its video processor", cls.__name__)
        return image_only(cls).from_pretrained(path, **kwargs)
    return AutoProcessor.from_pretrained(path, **kwargs)


def _class_for_config(path: str, **kwargs):
    from transformers import AutoConfig
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    try:
        model_type = AutoConfig.from_pretrained(path, **kwargs).model_type
    except (OSError, ValueError):
        return None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return processor_class_from_name(name) if name else None
