"""The ML facade a client process calls: base model + strategy + site data, train a round, evaluate, and move
adapter weights in and out as named tensors.

Adapter tensors are named exactly as in a PEFT ``adapter_model.safetensors`` (``peft.get_peft_model_state_dict``
keys), so ``adapter_state()`` saved with ``safetensors`` next to ``adapter_config()`` as JSON is a directory that
``peft.PeftModel.from_pretrained(base, dir)`` loads.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedvlm.algorithms import build as build_algorithm
from fedvlm.algorithms.base import ClientHook, Tensors, split_aux
from fedvlm.algorithms.lora_aggregation import merge_stack, trained_factors
from fedvlm.data.collate import BatchBuilder, encoder_for
from fedvlm.data.llava_json import Example, load_llava_json
from fedvlm.data.sources import resolve_site_data
from fedvlm.data_parallel import SINGLE_PROCESS, DataParallel
from fedvlm.recipe import check_site
from fedvlm.spec import TaskSpec
from fedvlm.tasks import MULTITASK, get_task, score_mixed
from fedvlm.train import TrainResult, generate_answers, train_local
from fedvlm.vlm.finetuning import apply_strategy, is_lora_key, set_stage, stage_for_round, stage_keys
from fedvlm.vlm.loading import load_base, resolve_device, resolve_model

logger = logging.getLogger(__name__)

THREADS_ENV = "FEDVLM_NUM_THREADS"
SPLIT_FILES = {"train": "train.json", "test": "test.json"}

__all__ = ["Learner", "RoundUpdate", "TrainResult"]


@dataclass(frozen=True)
class RoundUpdate:
    """A site's round (``Learner.federated_round``): ``update`` (the adapter tensors the round trained, CPU
    float32, as ``adapter_state(round)``) and ``aux`` (the algorithm's extra tensors, exactly the names its
    ``expected_aux`` asks for, without the wire prefix) together are the update file to sign and send;
    ``client_state`` is the algorithm's client state to keep for the next round (the previous one updated; empty
    for algorithms that keep none)."""

    update: Tensors
    aux: Tensors
    client_state: Tensors
    result: TrainResult

    def wire_tensors(self) -> Tensors:
        """The update file's tensors: ``update`` plus ``aux`` under the reserved prefix."""
        from fedvlm.algorithms.base import with_aux

        return with_aux(self.update, self.aux)


def configure_threads() -> None:
    """Apply ``$FEDVLM_NUM_THREADS`` to ``torch.set_num_threads`` when set (several clients may share a host)."""
    value = os.environ.get(THREADS_ENV)
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}") from None
        if threads < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive integer, got {value!r}")
        torch.set_num_threads(threads)


class BaseModelMismatch(ValueError):
    """This site's base weights are not the ones the run's initial adapter was built on."""


class Learner:
    """One site's model and data for a task spec.

    Guarantees: two Learners built from the same spec (on any site) start from identical base weights and
    identical adapters; only the strategy's parameters (LoRA on the language model and/or the connector) are
    trainable; the vision tower is frozen.
    """

    def __init__(
        self, spec: TaskSpec, data_dir: Path | None, device: str = "cpu", cache_dir: Path | None = None,
        lora_rank: int = 0,
    ) -> None:
        """``lora_rank``: a site-local LoRA rank instead of ``spec.lora.r`` (0 = the spec's), for sites with less
        memory or compute. Needs ``task.algorithm.lora_aggregation`` exact or flora (averaging A and B separately
        needs equal ranks); the adapter then differs from the global's schema: load a global with
        ``load_global_state``. The site that builds the initial adapter must use the spec's rank (that adapter
        defines the global's schema).

        The recipe (``spec.train.precision``, ``spec.quantization``, gradient checkpointing) applies to the base;
        the adapter is float32 in every case. ``SiteSetupError`` before anything is loaded if this site cannot
        train the recipe on ``device`` (fedvlm.recipe.check_site); ``OSError`` if the model cannot be had."""
        configure_threads()
        self.device = resolve_device(device)
        check_site(spec, self.device)  # fp16 without a GPU, quantization without bitsandbytes: before any loading
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = the task's rank), got {lora_rank}")
        if lora_rank and lora_rank != spec.lora.r and not spec.algorithm.heterogeneous_ranks:
            raise ValueError(f"a site-local LoRA rank ({lora_rank}, the task's is {spec.lora.r}) needs "
                             "task.algorithm.lora_aggregation = \"exact\" (lora_exact = true) or \"flora\": plain "
                             "averaging of lora_A and lora_B needs equal ranks")
        if spec.algorithm.lora_aggregation == "flora" and spec.quantization != "none":
            raise ValueError("task.algorithm.lora_aggregation = \"flora\" merges into the base weights, which a "
                             f"quantized base ({spec.quantization}) cannot take")
        self.lora_rank = lora_rank or spec.lora.r
        self.spec = spec
        self.algorithm = build_algorithm(spec.algorithm)
        self.task = get_task(spec.task_type) if spec.task_type != MULTITASK else None
        # Data first: a bad dataset should fail before minutes of model loading on a real model.
        self.use_data(data_dir)
        self.source = resolve_model(spec.model, cache_dir)
        self._base_digest: str | None = None
        base, self.processor = load_base(self.source, device=self.device, precision=spec.train.precision,
                                         quantization=spec.quantization)
        self.base_model_path = self.source.name  # what an exported adapter_config.json names as its base
        self.model = apply_strategy(_prepare_for_training(base, spec), spec.strategy, spec.lora, spec.seed,
                                    rank=self.lora_rank)
        for param in self.model.parameters():  # the adapter trains and travels in float32 whatever the base's dtype
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        if spec.quantization == "none":  # a quantized base was placed at load
            self.model.to(self.device)
        self.batches = BatchBuilder(encoder_for(self.model, self.processor))
        if self._examples["train"]:  # a processor or chat template that cannot encode this data fails now
            self.batches.warm(self._examples["train"][:1])
        self._schema = {k: (tuple(v.shape), v.dtype) for k, v in self._peft_state().items()}
        # FLoRA: every round restarts from this site's initial LoRA; the base weights before any merge.
        self._initial_lora = {k: v for k, v in self.adapter_state().items() if is_lora_key(k)} \
            if spec.algorithm.lora_aggregation == "flora" else {}
        self._unmerged: dict[str, torch.Tensor] = {}
        logger.info(
            "learner ready: model=%s strategy=%s train=%d test=%d adapter tensors=%d",
            spec.model, spec.strategy, self.num_train_examples, self.num_test_examples, len(self._schema),
        )

    # ---- data -------------------------------------------------------------------------------------------------
    def use_data(self, data_dir: Path | None) -> None:
        """Switch to another site's data (``data_dir``: a site folder, a FedVLMBench client file or any train JSON,
        fedvlm.data.sources); the model and adapter are kept. The in-process benchmark (fedvlm.study) reuses
        one model for many virtual sites this way; the result equals a Learner built on ``data_dir``."""
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._site_data = resolve_site_data(self.data_dir) if self.data_dir is not None else None
        self._examples = {split: self._load_split(split) for split in SPLIT_FILES}
        self._data_digest = self._site_data.train_digest() if self._site_data is not None else ""

    def _load_split(self, split: str) -> list[Example]:
        if self._site_data is None:
            return []
        examples = self._site_data.load(split)
        if self.task is None and any(ex.task is None for ex in examples):
            missing = next(ex for ex in examples if ex.task is None)
            raise ValueError(f"task_type multitask: record {missing.id!r} of the {split} split has no 'task' field")
        return examples

    @property
    def num_train_examples(self) -> int:
        """Examples in ``train.json`` (0 without data)."""
        return len(self._examples["train"])

    @property
    def num_test_examples(self) -> int:
        """Examples in ``test.json`` (0 if absent)."""
        return len(self._examples["test"])

    def base_model_digest(self) -> str:
        """SHA-256 over the base model's ``*.safetensors`` files (sorted by name) in its local directory: a preset's,
        the ``hf:<dir>`` given, or a hub id's snapshot in the Hugging Face cache (``""`` if it holds none). Equal
        digests on two sites mean byte-identical base weights, whether quantized at load or not. Computed once."""
        if self._base_digest is None:
            digest = hashlib.sha256()
            files = sorted(self.source.directory.glob("*.safetensors"))
            for path in files:
                digest.update(path.name.encode() + b"\0")
                with path.open("rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
            self._base_digest = digest.hexdigest() if files else ""
        return self._base_digest

    def base_model_info(self) -> str:
        """What the initial adapter records about its base (``adapters.BASE_MODEL_METADATA``): JSON of the task's
        model and ``base_model_digest()``."""
        return json.dumps({"model": self.spec.model, "sha256": self.base_model_digest()}, sort_keys=True)

    def check_base_model(self, recorded: str | None) -> None:
        """``BaseModelMismatch`` (one line) when ``recorded`` (a global's ``base_model_info``, None for runs started
        before globals carried it) names other base weights than this site's: an update trained on another base
        would be averaged into a global it does not fit."""
        if not recorded:
            return
        try:
            expected = json.loads(recorded)["sha256"]
        except (ValueError, KeyError, TypeError):
            raise BaseModelMismatch(f"the run's global names its base model unreadably: {recorded[:80]!r}") from None
        mine = self.base_model_digest()
        if expected and mine != expected:
            raise BaseModelMismatch(
                f"this site's base model for {self.spec.model!r} ({self.source.directory}, weights sha256 "
                f"{mine[:12] or 'none'}) differs from the run's (sha256 {expected[:12]}, from the site that built "
                "the initial adapter): use the same checkpoint, revision and fedvlm version as the other sites")

    # ---- adapter tensors --------------------------------------------------------------------------------------
    def _peft_state(self) -> dict[str, torch.Tensor]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model)

    def adapter_state(self, round_index: int | None = None) -> dict[str, torch.Tensor]:
        """The adapter tensors, keyed as in a PEFT ``adapter_model.safetensors``: CPU, float32, contiguous
        copies (mutating them never touches the model).

        ``round_index=None``: every tensor of the adapter (the initial upload, which defines the global's schema,
        and exports). With a round: only the tensors that round trains, i.e. the update to upload after
        ``train_round(round_index)``; that is all of them except for F-2stage, whose update holds only the
        connector before ``spec.switch_round`` and only the LoRA tensors from it on, and for
        ``lora_aggregation`` ffa / rolora, which send one LoRA factor (``factors``)."""
        state = self._peft_state()
        keys = stage_keys(state, self.stage(round_index), self.factors(round_index)) if round_index is not None \
            else list(state)
        return {k: state[k].detach().to(device="cpu", dtype=torch.float32).contiguous().clone() for k in keys}

    def stage(self, round_index: int) -> str | None:
        """F-2stage: ``"connector"`` or ``"lora"``, the part round ``round_index`` trains; None otherwise."""
        return stage_for_round(self.spec.strategy, self.spec.switch_round, round_index)

    def factors(self, round_index: int | None) -> frozenset[str]:
        """The LoRA factors ("A", "B") round ``round_index`` trains and sends (``lora_aggregation``)."""
        return trained_factors(self.spec.algorithm.lora_aggregation, round_index)

    def load_adapter_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trainable tensors from ``tensors``; the key set and every shape must match ``adapter_state()``
        exactly, else ``ValueError`` naming the missing, unexpected and mis-shaped keys (nothing is changed)."""
        from peft import set_peft_model_state_dict

        missing = sorted(set(self._schema) - set(tensors))
        unexpected = sorted(set(tensors) - set(self._schema))
        bad_shape = sorted(
            f"{k} {tuple(tensors[k].shape)} != {self._schema[k][0]}"
            for k in set(tensors) & set(self._schema)
            if tuple(tensors[k].shape) != self._schema[k][0]
        )
        not_float = sorted(k for k, v in tensors.items() if not torch.is_floating_point(v))
        problems = []
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape),
                             ("not floating point", not_float)):
            if names:
                problems.append(f"{label}: {', '.join(names[:10])}" + (" ..." if len(names) > 10 else ""))
        if problems:
            raise ValueError("adapter tensors do not match this model's adapter: " + "; ".join(problems))
        converted = {k: v.to(device=self.device, dtype=self._schema[k][1]) for k, v in tensors.items()}
        result = set_peft_model_state_dict(self.model, converted)
        leftover = [k for k in getattr(result, "unexpected_keys", []) if k.startswith("base_model.")]
        if leftover:  # pragma: no cover - guarded by the schema check
            raise ValueError(f"PEFT did not place adapter tensors: {', '.join(leftover[:10])}")

    def load_global_state(self, tensors: dict[str, torch.Tensor], round_index: int = 0) -> None:
        """``load_adapter_state`` for a global (as published: aux tensors under the wire prefix are read where the
        algorithm needs them, else ignored): with a site-local ``lora_rank``, each LoRA pair of another rank is
        first re-factorised to this site's rank (best approximation of B·A below the global's rank, B·A unchanged
        above it, the extra directions padded with seeded noise in A: ``lora_exact.fit_lora_ranks``). FLoRA: the
        global's stack is merged into the base weights and the LoRA restarts from this site's initialisation."""
        tensors, aux = split_aux(tensors)
        if self.spec.algorithm.lora_aggregation == "flora":
            merge_stack(self.model, aux, self._unmerged)
            tensors = {**tensors, **self._initial_lora}
        elif self.lora_rank != self.spec.lora.r:
            from fedvlm.algorithms.lora_exact import fit_lora_ranks, lora_ranks

            ranks = lora_ranks({k: shape for k, (shape, _) in self._schema.items()})
            tensors = fit_lora_ranks(tensors, ranks, seed=self._round_seed(round_index))
        self.load_adapter_state(tensors)

    def adapter_config(self) -> dict:
        """The ``adapter_config.json`` content ``PeftModel.save_pretrained`` writes for this model
        (``inference_mode`` true, ``base_model_name_or_path`` = the local base model directory or hub id)."""
        config = copy.deepcopy(self.model.peft_config["default"])
        config.inference_mode = True
        config.base_model_name_or_path = self.base_model_path
        config.revision = self.source.revision
        auto_mapping = None
        if config.task_type is None:  # what PeftModel.save_pretrained records for a task-less adapter
            base = self.model.get_base_model()
            auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
        with tempfile.TemporaryDirectory() as tmp:
            config.save_pretrained(tmp, auto_mapping_dict=auto_mapping)
            return json.loads((Path(tmp) / "adapter_config.json").read_text())

    # ---- train / evaluate -------------------------------------------------------------------------------------
    def _round_seed(self, round_index: int) -> int:
        key = f"{self.spec.seed}:{round_index}:{self._data_digest}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") & ((1 << 63) - 1)

    def adapter_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable parameters (``requires_grad`` now) keyed by their adapter tensor name (as in
        ``adapter_state()``): what an algorithm's client hook (fedvlm.algorithms) reads and corrects."""
        by_storage = {p.data_ptr(): p for p in self.model.parameters() if p.requires_grad}
        return {k: by_storage[v.data_ptr()] for k, v in self._peft_state().items() if v.data_ptr() in by_storage}

    def train_round(self, round_index: int, progress: Callable[[int, int], None] | None = None,
                    total_rounds: int = 0, hook: ClientHook | None = None,
                    group: DataParallel = SINGLE_PROCESS) -> TrainResult:
        """Train the adapter in place for round ``round_index`` of ``total_rounds`` (``spec.train``; the count is
        only needed by a cosine or warm-up schedule) on ``train.json``, from the adapter as it is.

        Reproducible: the shuffle and dropout are seeded by (spec.seed, round_index, digest of train.json).
        A fresh optimizer every round; ``hook`` is an algorithm's client hook made once the round's stage is set
        (``federated_round`` does that); ``group``: this process's place among the site's data-parallel processes,
        which all call it alike. ``ValueError`` if no training data.
        """
        if not self._examples["train"]:
            raise ValueError("no training examples (Learner was built without data_dir or train.json is empty)")
        # F-2stage, ffa, rolora: freeze the part this round does not train
        set_stage(self.model, self.stage(round_index), self.factors(round_index))
        self.prepare_batches()
        return train_local(self.model, self.batches, self._examples["train"], self.spec.train,
                           seed=self._round_seed(round_index), progress=progress, hook=hook,
                           round_index=round_index, total_rounds=total_rounds, group=group)

    def federated_round(self, global_state: Mapping[str, torch.Tensor], round_index: int, total_rounds: int,
                        client_state: Mapping[str, torch.Tensor] | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        group: DataParallel = SINGLE_PROCESS, loaded: bool = False) -> RoundUpdate:
        """A site's whole round: load ``global_state`` (the global as published: adapter tensors plus the
        algorithm's aux tensors under the wire prefix), train with ``task.algorithm``'s client hook, and return the
        update, its aux tensors and the new client state (``RoundUpdate``). ``client_state``: what the previous
        round returned (empty at first). ``loaded``: ``load_global_state(global_state, round_index)`` was the
        last change to the model (the agent loads the global to evaluate it first), so it is not loaded again.
        The one round step of the site agent and of the in-process benchmark."""
        if not loaded:
            self.load_global_state(dict(global_state), round_index)
        _, global_aux = split_aux(global_state)
        client_state = dict(client_state or {})
        # the hook sees exactly the parameters this round trains
        set_stage(self.model, self.stage(round_index), self.factors(round_index))
        hook = self.algorithm.client_hook(self.adapter_parameters(), global_aux, client_state)
        result = self.train_round(round_index, progress, total_rounds, hook, group)
        update = self.adapter_state(round_index)
        sent_aux, new_state = hook.finish()
        aux = {name: sent_aux[name] if name in sent_aux else torch.zeros_like(update[source])
               for name, source in self.algorithm.expected_aux(update).items()}
        return RoundUpdate(update=update, aux=aux, client_state={**client_state, **new_state}, result=result)

    def prepare_batches(self) -> None:
        """Encode the training examples with the model's processor now (up to the encode cache's budget, see
        fedvlm.data.collate.BatchBuilder), so that training steps only pad and stack; a no-op once done."""
        examples = self._examples["train"]
        started = time.perf_counter()
        cached = self.batches.warm(examples)
        if time.perf_counter() - started > 1.0:
            logger.info("encoded %d of %d training examples in %.1fs (%.0f MiB cached)", cached, len(examples),
                        time.perf_counter() - started, self.batches.cached_bytes / (1 << 20))

    def evaluate(self, split: str = "test") -> dict[str, float]:
        """Greedy generation (at most ``spec.train.max_new_tokens`` new tokens) on ``split``, parsed and scored by
        the task (``fedvlm.tasks``): e.g. ``{"accuracy", "num_examples"}`` for classification, BLEU/ROUGE-L/CIDEr
        for captioning, mIoU for grounding; prefixed per task for multi-task data. ``ValueError`` if the split is
        empty."""
        if split not in SPLIT_FILES:
            raise ValueError(f"unknown split {split!r} (known: {', '.join(SPLIT_FILES)})")
        examples = self._examples[split]
        if not examples:
            raise ValueError(f"no {split} examples ({SPLIT_FILES[split]} missing or empty under {self.data_dir})")
        return self._score(examples, split)

    def evaluate_json(self, path: Path) -> dict[str, float]:
        """Like ``evaluate`` but on any LLaVA JSON file (e.g. a global held-out set such as digits' ``test.json``);
        the file is validated like site data (``DataError`` on bad records)."""
        examples = load_llava_json(Path(path))
        if not examples:
            raise ValueError(f"no examples in {path}")
        return self._score(examples, str(path))

    def _score(self, examples: list[Example], label: str) -> dict[str, float]:
        train = self.spec.train
        answers = generate_answers(self.model, self.batches, examples, train.eval_batch_size, train.max_new_tokens,
                                   train.precision)
        # A record's own ``task`` field wins over the spec's task type (multi-task data).
        tasks = [ex.task or self.spec.task_type for ex in examples]
        metrics = score_mixed(tasks, answers, [ex.answer for ex in examples])
        logger.info("evaluate %s: %s (first answers %s)", label, metrics, answers[:3])
        return metrics


def _prepare_for_training(base: torch.nn.Module, spec: TaskSpec) -> torch.nn.Module:
    """The base as the recipe trains it: a quantized base through ``peft.prepare_model_for_kbit_training`` (its
    norms and embeddings in float32), and gradient checkpointing when asked. Checkpointing is non-reentrant
    (``use_reentrant=False``): with a frozen base the inputs of a checkpointed layer need no gradient (the reentrant
    variant would drop the LoRA gradients unless ``enable_input_require_grads`` is hooked in), and it restores the
    RNG state, so dropout masks and hence losses and gradients equal those without checkpointing."""
    kwargs = {"use_reentrant": False}
    if spec.quantization != "none":
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(base, use_gradient_checkpointing=spec.train.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=kwargs)
    if spec.train.gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ValueError(f"task.train.gradient_checkpointing: {type(base).__name__} does not support it")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return base
