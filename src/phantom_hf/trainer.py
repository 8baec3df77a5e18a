"""Phantom Optimization (paper Sec. 3, Eq. 4, Algorithm 1) and the paper's two-step recipe, on TRL's CPO trainer.

    L_PO = L_SFT(y+ | x) - E[log sigmoid(beta/|y+| log pi(y+|x) - beta/|y-| log pi(y-|x) - gamma)]

is TRL's CPO loss with `loss_type="simpo"`, `cpo_alpha=1.0` (the SFT term), `beta=2.0`, `simpo_gamma=0.5`.
`PhantomPOTrainer` adds what CPO lacks for Phantom: images (tokenised by `PhantomProcessor`, the vision
tower and projector run once per triple and shared by the chosen and rejected sequences), the freezing of
each training stage, and validation of the triples (see `phantom_hf.data`).

Step 1 (`training_stage=1`): the language model (and by default the vision tower) is frozen; the projector
and the Phantom Dimension modules train with PO. Step 2 (`training_stage=2`): everything trains (except what
the user freezes) with plain SFT: the preference weight `po_weight` defaults to 0 there, because the paper's
Table 4 measures that keeping PO in step 2 hurts. With `po_weight=0` the training steps run the chosen answers only (the
rejected ones would only feed CPO's reward metrics), so step 2 costs what plain SFT costs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset
from PIL import Image as PILImage
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

with warnings.catch_warnings():  # CPO lives in trl.experimental in TRL 1.x; importing it from there is deliberate
    warnings.filterwarnings("ignore", message=".*trl.experimental.*")
    from trl.experimental.cpo import CPOConfig, CPOTrainer

from .data import InvalidPolicy, TripleProblem, undecoded_images, validate_triples
from .modeling.compat_phantom import checkpointing_field
from .modeling.configuration_phantom import PHANTOM_MODULE_NAMES, is_phantom_name
from .threads import use_cpu_thread_policy

logger = logging.getLogger(__name__)

TRAINING_STAGES = (1, 2)
# Attention sub-modules of the language model that a LoRA adapter targets (Llama/Qwen/Mistral/Phi-3 names).
LORA_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|qkv_proj|o_proj|gate_proj|up_proj|gate_up_proj|down_proj)"
# Modules trained in full (not through LoRA) in step 2 with PEFT: the projector and every Phantom module.
PHANTOM_MODULES_TO_SAVE = ["multi_modal_projector", *PHANTOM_MODULE_NAMES]


def bf16_default(fp16: bool = False, use_cpu: bool = False) -> bool:
    """Whether training runs in bf16 when the configuration does not say: where the machine has a bf16 accelerator
    (a GPU that supports it, or XLA) and neither fp16 nor the CPU is asked for. TRL turns bf16 on everywhere, which
    transformers refuses on a machine without such an accelerator."""
    return not fp16 and not use_cpu and (is_torch_bf16_gpu_available() or is_torch_xla_available())


@dataclass
class PhantomPOConfig(CPOConfig):
    r"""Configuration of `PhantomPOTrainer`: TRL's `CPOConfig` with the paper's defaults and the recipe's stages.

    Defaults that differ from `CPOConfig`: `loss_type="simpo"`, `beta=2.0`, `learning_rate=1e-5` with a cosine
    schedule down to a tenth of it (`cosine_with_min_lr`, `min_lr_rate=0.1`: 1e-5 -> 1e-6),
    `remove_unused_columns=False` (the collator reads the raw triple columns), and `bf16` on only where the machine
    has a bf16 accelerator (CPO turns it on everywhere, which transformers refuses on a CPU-only machine). `cpo_alpha=1.0`,
    `simpo_gamma=0.5`, AdamW and activation (gradient) checkpointing are CPO's defaults already.

    Parameters:
        training_stage (`int`, defaults to `1`):
            1: language model frozen, projector + Phantom modules train with PO. 2: everything trains (except
            `freeze_vision_tower` / `freeze_parameters`), loss = SFT only by default.
        po_weight (`float`, *optional*):
            Weight of the preference (SimPO) term; the SFT term is weighted by `cpo_alpha`. Defaults to 1.0 in
            stage 1 and 0.0 in stage 2 (paper Table 4: PO in step 2 hurts).
        freeze_vision_tower (`bool`, *optional*):
            Keep the vision tower frozen. Defaults to True in stage 1 and False in stage 2 ("unfreeze everything").
        freeze_parameters (`list[str]`, *optional*):
            Regular expressions; parameters whose name matches one (`re.search`) stay frozen in either stage.
        invalid_triples (`str`, defaults to `"skip"`):
            What to do with a bad triple (chosen == rejected, empty answer, missing image file): `"skip"` it and
            log its row index and reason, or `"raise"` a `ValueError` listing them.
        apply_chat_template (`bool`, defaults to `True`):
            Wrap each prompt as a user turn with the processor's chat template (generation prompt added).
    """

    training_stage: int = field(default=1, metadata={"help": "1: projector + Phantom modules with PO; 2: all, SFT."})
    po_weight: float | None = field(
        default=None, metadata={"help": "Weight of the preference term; default 1.0 in stage 1, 0.0 in stage 2."}
    )
    freeze_vision_tower: bool | None = field(
        default=None, metadata={"help": "Freeze the vision tower; default True in stage 1, False in stage 2."}
    )
    freeze_parameters: list[str] | None = field(
        default=None, metadata={"help": "Regexes of parameter names that stay frozen."}
    )
    invalid_triples: str = field(
        default="skip", metadata={"help": "'skip' (with a report) or 'raise' on invalid triples.", "choices": ["skip", "raise"]}
    )
    apply_chat_template: bool = field(
        default=True, metadata={"help": "Format each prompt as a user turn with the processor's chat template."}
    )

    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Checkpoint activations (default True); `activation_checkpointing` in transformers >= 5.23."}
    )
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate of AdamW (paper: 1e-5)."})
    lr_scheduler_type: str = field(default="cosine_with_min_lr", metadata={"help": "Learning-rate schedule."})
    loss_type: str = field(
        default="simpo",
        metadata={"help": "Type of loss to use.", "choices": ["sigmoid", "hinge", "ipo", "simpo", "alphapo"]},
    )
    beta: float = field(default=2.0, metadata={"help": "SimPO beta of Eq. 4."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the collator needs the raw triple columns."}
    )

    def __post_init__(self) -> None:
        if self.training_stage not in TRAINING_STAGES:
            raise ValueError(f"training_stage must be 1 or 2, got {self.training_stage!r}")
        if self.invalid_triples not in ("skip", "raise"):
            raise ValueError(f"invalid_triples must be 'skip' or 'raise', got {self.invalid_triples!r}")
        if self.po_weight is None:
            self.po_weight = 1.0 if self.training_stage == 1 else 0.0
        if self.po_weight < 0:
            raise ValueError(f"po_weight must be >= 0, got {self.po_weight!r}")
        if self.freeze_vision_tower is None:
            self.freeze_vision_tower = self.training_stage == 1
        # both names work on every supported release, and the default (on) is set under the running release's name
        # (compat_phantom.checkpointing_field), so neither name warns
        if checkpointing_field(self) == "activation_checkpointing":
            if self.activation_checkpointing is None:
                on = self.gradient_checkpointing
                self.activation_checkpointing = True if on is None else on
            self.gradient_checkpointing = None
        elif self.gradient_checkpointing is None:
            self.gradient_checkpointing = True
        if self.lr_scheduler_type == "cosine_with_min_lr" and not self.lr_scheduler_kwargs:
            self.lr_scheduler_kwargs = {"min_lr_rate": 0.1}
        if self.remove_unused_columns:
            raise ValueError("PhantomPOConfig.remove_unused_columns must be False: the collator reads the triple columns")
        if self.bf16 is None:
            self.bf16 = bf16_default(self.fp16, self.use_cpu)
        super().__post_init__()
        if self.generate_during_eval:
            raise ValueError("generate_during_eval is not supported by PhantomPOTrainer (CPO's generation ignores images)")


def is_quantized_weight(parameter: torch.Tensor) -> bool:
    """A weight a quantization backend replaced: integer storage (bitsandbytes) or a tensor subclass (torchao's),
    other than a sharded `DTensor` (FSDP 2)."""
    from torch.distributed.tensor import DTensor

    data = parameter.data
    return not parameter.dtype.is_floating_point or (type(data) is not torch.Tensor and not isinstance(data, DTensor))


def apply_training_stage(
    model: nn.Module,
    training_stage: int,
    freeze_vision_tower: bool = True,
    freeze_parameters: list[str] | None = None,
) -> list[str]:
    """Set `requires_grad` of every parameter of a Phantom model for a stage of the recipe; return the trainable names.

    Stage 1: only the projector and the Phantom modules (`is_phantom_name`),
    plus the vision tower when `freeze_vision_tower` is False. Stage 2: every parameter, minus the vision tower
    when `freeze_vision_tower` is True. In both, names matching a regex of `freeze_parameters` stay frozen, and so do
    quantized weights (a model loaded with a `quantization_config`): they train through an adapter (QLoRA,
    `phantom_lora_config`).
    """
    if training_stage not in TRAINING_STAGES:
        raise ValueError(f"training_stage must be 1 or 2, got {training_stage!r}")
    vision = {id(parameter) for parameter in model.get_submodule("model.vision_tower").parameters()}
    projector = {id(parameter) for parameter in model.get_submodule("model.multi_modal_projector").parameters()}
    patterns = [re.compile(pattern) for pattern in freeze_parameters or []]
    trainable = []
    for name, parameter in model.named_parameters():
        if id(parameter) in vision:
            train = not freeze_vision_tower
        elif training_stage == 1:
            train = id(parameter) in projector or is_phantom_name(name)
        else:
            train = True
        if any(pattern.search(name) for pattern in patterns) or is_quantized_weight(parameter):
            train = False
        parameter.requires_grad_(train)
        if train:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"training_stage={training_stage} with these freeze settings leaves no parameter to train")
    return trainable


def phantom_lora_config(r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, **kwargs: Any) -> Any:
    """A `peft.LoraConfig` for step 2: LoRA on the language model's projections, the projector and the Phantom
    modules trained in full (`modules_to_save`), so that the saved adapter carries them too."""
    from peft import LoraConfig

    kwargs.setdefault("target_modules", LORA_TARGET_MODULES)
    kwargs.setdefault("modules_to_save", list(PHANTOM_MODULES_TO_SAVE))
    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, **kwargs)


def _image_source(ref: Any) -> Any:
    """What the processor decodes for one image reference: a PIL image or a path as they are, a datasets `Image`
    record ({"bytes", "path"}) as its bytes or path. The processor is the one place images become pixels (alpha
    laid over white, 16-bit and float images scaled)."""
    if isinstance(ref, dict):
        if ref.get("bytes"):
            return ref["bytes"]
        if ref.get("path"):
            return ref["path"]
        raise ValueError("an image record has neither bytes nor a path")
    if isinstance(ref, (PILImage.Image, str, os.PathLike)):
        return ref
    raise TypeError(f"cannot read an image from {type(ref).__name__}")


# What a checkpoint folder holds once `Trainer._save_checkpoint` has finished: the trainer state is written last.
_CHECKPOINT_STATE = "trainer_state.json"
_CHECKPOINT_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why `folder` is not a complete Trainer checkpoint (None when it is): a checkpoint interrupted while being
    written lacks its trainer state (written last) or its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} is not a folder"
    state = folder / _CHECKPOINT_STATE
    if not state.is_file():
        return f"{folder} has no {_CHECKPOINT_STATE} (it was interrupted while being written)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{state} is not valid JSON ({error})"
    distributed = any(folder.glob("global_step*")) or any(folder.glob("pytorch_model_fsdp*"))
    if not distributed and not any((folder / name).is_file() for name in _CHECKPOINT_WEIGHTS):
        return f"{folder} has no model weights"
    return None


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The `checkpoint-N` folder of `folder` with the highest N that is complete (see `checkpoint_problem`), or None.
    Incomplete ones after it are skipped with a warning naming them and why."""
    folder = Path(folder)
    numbered = [(int(match.group(1)), path) for path in folder.iterdir() if (match := _CHECKPOINT_NAME.match(path.name))]
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping the incomplete checkpoint %s: %s", path, problem)
    return None


def consolidate_fsdp_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> str:
    """Turn a sharded FSDP checkpoint of `PhantomPOTrainer` (`checkpoint-N/` with `pytorch_model_fsdp_0/`) into a
    model folder that `from_pretrained` loads (config, `model.safetensors`, processor, remote code); return it.

    Runs in one process on the CPU: accelerate's `merge_fsdp_weights` reads the shards of every rank. A checkpoint of
    a LoRA run holds the adapter inside the PEFT model's names: save the trained adapter with `trainer.save_model`
    instead (it gathers the full state). `output_dir` is written whole or not at all.
    """
    import shutil
    import tempfile

    from accelerate.utils import merge_fsdp_weights

    from .modeling import PhantomForConditionalGeneration
    from .modeling.processing_phantom import PhantomProcessor

    checkpoint, output_dir = Path(checkpoint), Path(output_dir)
    shards = checkpoint / "pytorch_model_fsdp_0"
    if not shards.is_dir():
        raise ValueError(f"{checkpoint} is not a sharded FSDP checkpoint: it has no pytorch_model_fsdp_0/ folder")
    if not (checkpoint / "config.json").is_file():
        raise ValueError(f"{checkpoint} has no config.json: it was not written by PhantomPOTrainer")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}-") as staging:
        merged = Path(staging) / "merged"
        merge_fsdp_weights(str(shards), str(merged), safe_serialization=True)
        shutil.copy(checkpoint / "config.json", merged / "config.json")
        model = PhantomForConditionalGeneration.from_pretrained(merged)
        if any(name.startswith("base_model.") or "lora_" in name for name in model.state_dict()):
            raise ValueError(f"{checkpoint} holds a PEFT model: save its adapter with trainer.save_model instead")
        built = Path(staging) / "model"
        model.save_pretrained(built)
        PhantomProcessor.from_pretrained(checkpoint).save_pretrained(built)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        built.rename(output_dir)
    return str(output_dir)


def save_trained_model(
    model: nn.Module, processor: Any, output_dir: str | os.PathLike, card: Mapping[str, Any] | None = None
) -> bool:
    """Save a trained `model` and its `processor` (and with `card`, its model card) as a model folder
    (`hub.save_model_folder`), from one process or from each process of a distributed run (call it on every
    process); return True on the process that wrote the folder (the main one).

    A model sharded by FSDP2 (its parameters are `DTensor` shards) or by DeepSpeed ZeRO-3 (partitioned parameters)
    is gathered first, every process taking part, and written by the main process as a normal `from_pretrained`
    folder.
    """
    import contextlib

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    state = PartialState()
    state_dict = None
    gathered: Any = contextlib.nullcontext()
    parameters = list(model.parameters())
    if any(isinstance(parameter, DTensor) for parameter in parameters):
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif any(hasattr(parameter, "ds_id") for parameter in parameters):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None)
    with gathered:
        if state.is_main_process:
            from .hub import save_model_folder

            save_model_folder(output_dir, model, processor, card, state_dict=state_dict)
    state.wait_for_everyone()
    return state.is_main_process


class PhantomPOCollator:
    """Tokenises Phantom triples with a `PhantomProcessor` and pads them right into CPO's batch layout.

    Returns `chosen_input_ids`, `chosen_attention_mask`, `chosen_labels` (prompt tokens at -100), the same
    for `rejected_`, `prompt_input_ids`/`prompt_attention_mask` (left-padded, for generation), and
    `pixel_values`: the tiles of every row's images in row order, once per triple (absent when the batch has
    no image). Each prompt is tokenised once, with its images; the answers are appended to it token-wise,
    ending with the EOS token. With `max_length`, answers are truncated (never the prompt, whose image tokens
    must stay whole); a prompt that leaves no room for an answer is an error.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int | None = None,
        apply_chat_template: bool = True,
        label_pad_token_id: int = -100,
    ) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None or not callable(processor):
            raise TypeError(f"processor must be a PhantomProcessor (callable, with .tokenizer), got {type(processor).__name__}")
        self.processor = processor
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.apply_chat_template = apply_chat_template
        self.label_pad_token_id = label_pad_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        if apply_chat_template and not getattr(processor, "chat_template", None):
            raise ValueError("apply_chat_template=True but the processor has no chat_template; set it or pass False")

    def format_prompt(self, prompt: str) -> str:
        """The prompt as the model sees it: a user turn plus the generation prompt, or as is."""
        return self.processor.user_prompt(prompt) if self.apply_chat_template else prompt

    def _answer_ids(self, answers: list[str]) -> list[list[int]]:
        """Each answer's token ids, ending with the EOS token."""
        eos = self.tokenizer.eos_token_id
        rows = [list(ids) for ids in self.tokenizer(answers, add_special_tokens=False)["input_ids"]]
        return [ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids for ids in rows]

    def _pad(self, rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(row) for row in rows)
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for index, row in enumerate(rows):
            if row:
                target = out[index, width - len(row) :] if left else out[index, : len(row)]
                target.copy_(torch.tensor(row, dtype=torch.long))
        return out

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [[_image_source(ref) for ref in row.get("images") or []] for row in features]
        # One unpadded processor call for the whole batch (per-call overhead dominates with small images).
        encoded = self.processor(
            text=[self.format_prompt(row["prompt"]) for row in features], images=images if any(images) else None
        )
        prompts = [list(ids) for ids in encoded["input_ids"]]
        sequences: dict[str, list[list[int]]] = {}
        for kind in ("chosen", "rejected"):
            sequences[kind] = []
            for prompt_ids, answer in zip(prompts, self._answer_ids([row[kind] for row in features])):
                if self.max_length is not None:
                    answer = answer[: max(0, self.max_length - len(prompt_ids))]
                if not answer:
                    raise ValueError(
                        f"the prompt is {len(prompt_ids)} tokens (image tokens included), which leaves no room for the "
                        f"{kind} answer within max_length={self.max_length}; raise max_length"
                    )
                sequences[kind].append(prompt_ids + answer)
        batch: dict[str, torch.Tensor] = {}
        for kind, rows in sequences.items():
            batch[f"{kind}_input_ids"] = self._pad(rows, self.pad_token_id)
            batch[f"{kind}_attention_mask"] = self._pad([[1] * len(row) for row in rows], 0)
            labels = [[self.label_pad_token_id] * len(prompt) + row[len(prompt) :] for prompt, row in zip(prompts, rows)]
            batch[f"{kind}_labels"] = self._pad(labels, self.label_pad_token_id)
        batch["prompt_input_ids"] = self._pad(prompts, self.pad_token_id, left=True)
        batch["prompt_attention_mask"] = self._pad([[1] * len(row) for row in prompts], 0, left=True)
        if "pixel_values" in encoded:
            batch["pixel_values"] = torch.from_numpy(np.stack(encoded["pixel_values"]))
        return batch


class PhantomPOTrainer(CPOTrainer):
    """TRL's `CPOTrainer` for Phantom models: Phantom Optimization (Eq. 4), images, the two training stages.

    Args:
        model: a Phantom model (`PhantomForConditionalGeneration`, or a path/Hub id of one).
        args: a `PhantomPOConfig`.
        train_dataset / eval_dataset: Phantom triples (`images`, `prompt`, `chosen`, `rejected`); invalid rows
            are reported and skipped or refused (`args.invalid_triples`); the report is `invalid_triples`.
        processing_class: the `PhantomProcessor` (tokenizer + image processor + chat template).
        peft_config: a `peft.LoraConfig` for stage 2 (see `phantom_lora_config`).
        data_collator: defaults to `PhantomPOCollator`.

    Other keyword arguments go to `CPOTrainer`. The vision tower and projector run once per batch of triples,
    and their output is shared by the chosen and rejected sequences of each triple.
    """

    _tag_names = ["trl", "cpo", "phantom"]
    _name = "PhantomPO"

    def __init__(
        self,
        model: PreTrainedModel | str,
        args: PhantomPOConfig | None = None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class: Any = None,
        peft_config: Any = None,
        data_collator: Any = None,
        **kwargs: Any,
    ) -> None:
        if args is None:
            args = PhantomPOConfig(output_dir="phantom-po")
        if not isinstance(args, PhantomPOConfig):
            raise TypeError(f"args must be a PhantomPOConfig, got {type(args).__name__}")
        if processing_class is None or getattr(processing_class, "tokenizer", None) is None:
            raise TypeError("processing_class must be the model's PhantomProcessor (it tokenises prompts with images)")
        if train_dataset is None:
            raise ValueError("train_dataset is required")
        if isinstance(model, str):
            from transformers import AutoModelForImageTextToText

            init_kwargs = dict(args.model_init_kwargs or {})
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(model, **init_kwargs)
            args.model_init_kwargs = None
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            raise ValueError(
                "the model is already sharded by FSDP (a previous trainer prepared it): save it with "
                "trainer.save_model(folder) and load that folder for the next step (with `phantom-hf train`, run "
                "--steps 1 and --steps 2 as two launches)"
            )
        if getattr(getattr(model, "config", None), "model_type", None) != "phantom":
            raise TypeError(f"PhantomPOTrainer trains Phantom models, got {type(model).__name__}")
        if peft_config is not None and args.training_stage == 1:
            raise ValueError(
                "peft_config is for training_stage=2: stage 1 trains only the projector and the Phantom modules, in full"
            )

        trainable = apply_training_stage(model, args.training_stage, args.freeze_vision_tower, args.freeze_parameters)
        logger.info("training stage %d: %d trainable parameter tensors", args.training_stage, len(trainable))

        self.invalid_triples: dict[str, list[TripleProblem]] = {}
        train_dataset = self._prepare_triples(train_dataset, "train", args.invalid_triples)
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                name: self._prepare_triples(data, f"eval/{name}", args.invalid_triples) for name, data in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_triples(eval_dataset, "eval", args.invalid_triples)

        if data_collator is None:
            data_collator = PhantomPOCollator(
                processing_class, max_length=args.max_length, apply_chat_template=args.apply_chat_template
            )
        self.processor = processing_class
        self.po_weight = float(args.po_weight)
        # CPO reads pad/eos tokens off its processing class: hand it the tokenizer, then keep the processor so
        # that checkpoints and the final model folder carry the image processor and chat template too.
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class.tokenizer,
            peft_config=peft_config,
            **kwargs,
        )
        self.processing_class = processing_class
        self.callback_handler.processing_class = processing_class
        use_cpu_thread_policy(self.model)

    def create_accelerator_and_postprocess(self) -> None:
        """`Trainer`'s accelerator, with FSDP kept on a CPU-only machine (gloo) when FSDP was asked for.

        accelerate turns an FSDP request (`accelerate launch` with an FSDP config, or `fsdp`/`fsdp_config` in the
        arguments) into `DistributedType.FSDP` on accelerator devices only: on CPU processes it keeps
        `MULTI_CPU` and silently trains with DDP. PyTorch's FSDP2 (`fully_shard`) runs on CPU tensors over gloo,
        so here the state is set to FSDP with the requested plugin, and accelerate's own FSDP2 preparation,
        sharded checkpointing and state-dict gathering run as they do on GPUs. docs/design.md, "Training past one
        device".
        """
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        requested = self.args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if state.distributed_type != DistributedType.MULTI_CPU or not requested or getattr(state, "fsdp_plugin", None):
            return
        from accelerate.utils import FullyShardedDataParallelPlugin

        state.fsdp_plugin = FullyShardedDataParallelPlugin(**(self.args.fsdp_plugin_args or {}))
        state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True
        checkpointing = getattr(self.args, "activation_checkpointing", None) or self.args.gradient_checkpointing
        if state.fsdp_plugin.activation_checkpointing and checkpointing:
            raise ValueError(
                "FSDP's activation_checkpointing and the trainer's gradient checkpointing cannot both be on: "
                "turn one of them off"
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`; under FSDP with sharded state dicts the result still loads with `from_pretrained`.

        A final save (`trainer.save_model(folder)`) gathers the full weights onto the main process for that save
        (accelerate's `set_state_dict_type("FULL_STATE_DICT")`, the sharded type restored after), so the folder is
        a normal model (or adapter) folder. A checkpoint keeps its shards (`pytorch_model_fsdp_0/`, for resuming)
        and gets the config and processor files beside them, which `consolidate_fsdp_checkpoint` needs.
        """
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is None or "SHARDED_STATE_DICT" not in str(plugin.state_dict_type):
            super().save_model(output_dir, _internal_call)
            return
        if not _internal_call:
            saved = plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config
            plugin.state_dict_config = plugin.optim_state_dict_config = None
            plugin.set_state_dict_type("FULL_STATE_DICT")
            try:
                super().save_model(output_dir, _internal_call)
            finally:
                plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = saved
            return
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            self.accelerator.unwrap_model(self.model).config.save_pretrained(output_dir)
            self.processing_class.save_pretrained(output_dir)

    def _prepare_triples(self, dataset: Dataset, split: str, on_invalid: InvalidPolicy) -> Dataset:
        valid, problems = validate_triples(dataset, on_invalid=on_invalid)
        self.invalid_triples[split] = problems
        if len(valid) == 0:
            raise ValueError(f"no valid Phantom triple left in the {split} dataset ({len(problems)} problem(s))")
        return undecoded_images(valid)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, resuming only from complete checkpoints. `resume_from_checkpoint` defaults to
        `args.resume_from_checkpoint` (a recipe's setting is honoured, where `Trainer` ignores it). True picks the
        last complete checkpoint of `args.output_dir`, skipping (with a warning) one that was interrupted while being
        written; a given folder must be complete, or a `ValueError` says what it lacks."""
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "false", ""):
            resume_from_checkpoint = resume_from_checkpoint.strip().lower() == "true"
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
            if found is None:
                raise ValueError(f"no complete checkpoint to resume from in {self.args.output_dir}")
            resume_from_checkpoint = found
        elif resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(f"cannot resume from {resume_from_checkpoint}: {problem}")
        else:
            resume_from_checkpoint = None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def tokenize_row(self, feature: dict[str, Any], model: nn.Module | None = None) -> dict:
        """Nothing to do ahead of time: `PhantomPOCollator` tokenises each batch with its images."""
        return {}

    def concatenated_forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple:
        """CPO's single forward over chosen + rejected rows, with the images encoded once per triple.

        CPO stacks the chosen rows, then the rejected rows: the placeholders of both halves take the same tiles
        in the same order. The batch's `pixel_values` are passed once with `image_tile_index` = [0..T-1, 0..T-1],
        so the model runs the vision tower and projector on the T tiles once and fills both halves from them.
        Everything runs inside the wrapped model's forward, as DDP, FSDP and DeepSpeed expect.
        """
        pixel_values = batch.get("pixel_values")
        if pixel_values is None:
            return super().concatenated_forward(model, batch)
        tiles = torch.arange(pixel_values.shape[0], device=pixel_values.device)
        shared = functools.partial(model, pixel_values=pixel_values, image_tile_index=tiles.repeat(2))
        return super().concatenated_forward(shared, batch)

    def get_batch_loss_metrics(
        self, model: nn.Module, batch: dict[str, Any], train_eval: str = "train"
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """CPO's loss and metrics; with `po_weight=0` (plain SFT, stage 2's default) training runs the chosen rows only.

        The preference term is then zero, so the rejected rows would only feed CPO's reward metrics at the price
        of a second forward and backward over the batch. Evaluation keeps the full pass and its metrics.
        """
        if self.po_weight or train_eval != "train" or self.aux_loss_enabled:
            return super().get_batch_loss_metrics(model, batch, train_eval)
        device = self.accelerator.device
        inputs: dict[str, Any] = {"attention_mask": batch["chosen_attention_mask"].to(device), "use_cache": False}
        if batch.get("pixel_values") is not None:
            inputs["pixel_values"] = batch["pixel_values"].to(device)
        logits = model(batch["chosen_input_ids"].to(device), **inputs).logits
        labels = batch["chosen_labels"].to(logits.device)
        nll_loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        chosen_logps = self.get_batch_logps(logits, labels, average_log_prob=self.loss_type in ("ipo", "simpo"))
        gather = self.accelerator.gather_for_metrics
        metrics = {
            "nll_loss": gather(nll_loss.detach()).mean().item(),
            "logps/chosen": gather(chosen_logps.detach()).mean().item(),
            "logits/chosen": gather(logits.detach().mean()).mean().item(),
        }
        return self.cpo_alpha * nll_loss, metrics

    def cpo_loss(
        self, policy_chosen_logps: torch.FloatTensor, policy_rejected_logps: torch.FloatTensor
    ) -> tuple[torch.FloatTensor, torch.FloatTensor, torch.FloatTensor]:
        """CPO's per-row preference loss scaled by `po_weight` (0 in stage 2: SFT only); rewards unchanged."""
        losses, chosen_rewards, rejected_rewards = super().cpo_loss(policy_chosen_logps, policy_rejected_logps)
        return self.po_weight * losses, chosen_rewards, rejected_rewards


__all__ = [
    "LORA_TARGET_MODULES",
    "PHANTOM_MODULES_TO_SAVE",
    "PhantomPOCollator",
    "PhantomPOConfig",
    "PhantomPOTrainer",
    "apply_training_stage",
    "bf16_default",
    "consolidate_fsdp_checkpoint",
    "phantom_lora_config",
    "save_trained_model",
]
