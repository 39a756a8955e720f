"""Model construction: the quantized base with its LoRA adapter, and the adapter alone.

`build_model` is the one place a client pays for imports and weights, so a longer-lived
worker can call it once. `initial_adapter` lets the ServerApp start training without a
GPU or the base weights: PEFT wraps a weightless (meta) copy of the model built from its
`config.json`, which yields exactly the keys, shapes and dtypes a client's adapter has.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from app.config import ModelSettings


def lora_config(settings: ModelSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.lora.r,
        lora_alpha=settings.lora.alpha,
        lora_dropout=settings.lora.dropout,
        target_modules=list(settings.lora.target_modules),
        task_type="CAUSAL_LM",
        base_model_name_or_path=settings.name,
    )


def load_tokenizer(settings: ModelSettings) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(settings.name, padding_side="right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _quantization(settings: ModelSettings) -> BitsAndBytesConfig | None:
    """The 4-bit kind and double quantization are settings (the template: fp4, none).

    Compute runs in bf16, not in bitsandbytes' float32 default that the template gets:
    see docs/fidelity.md.
    """
    if settings.quantization == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=settings.quantization_type,
            bnb_4bit_use_double_quant=settings.double_quantization,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if settings.quantization == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def build_model(settings: ModelSettings) -> PeftModel:
    """The trainable model on the node's one visible GPU, or on the CPU where there is none.

    Norms and embeddings stay in bf16 (no `prepare_model_for_kbit_training` upcast): the
    fp32 copy of Gemma2's 256k-row embedding alone would cost 3.7 GB per client.
    Checkpointing "auto" must be resolved first (`gpu_admission.resolve_checkpointing`).
    """
    if settings.gradient_checkpointing is None:
        raise ValueError("model.gradient-checkpointing = auto: resolve it for this GPU before building the model")
    on_gpu = torch.cuda.is_available()
    if settings.quantization and not on_gpu:
        raise RuntimeError(f"model.quantization = {settings.quantization} needs a CUDA GPU; use 0 on the CPU")
    model = AutoModelForCausalLM.from_pretrained(
        settings.name,
        quantization_config=_quantization(settings),
        dtype=torch.bfloat16 if on_gpu else torch.float32,
        device_map={"": 0} if on_gpu else None,
        attn_implementation=settings.attention,  # soft-capping is exact in both allowed kinds
    )
    # We never generate; a hub generation config asking for a hybrid cache would only
    # make transformers warn (and, in some versions, crash its logging) once use_cache is off.
    model.config.use_cache = False
    model.generation_config.cache_implementation = None
    model.generation_config.use_cache = False
    if settings.gradient_checkpointing:
        # Reentrant checkpointing trained 1.21x faster than non-reentrant at equal memory on
        # an H100 (bench/memory/reentrant_ab.txt); it needs inputs that require grad, hence
        # enable_input_require_grads, since the embedding itself is frozen.
        if hasattr(model, "activation_checkpointing_enable"):  # the old name warns where this exists
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    peft_model = _with_lora(model, settings)
    if settings.compile:
        # Each decoder layer compiled, LoRA inside it and the 4-bit matmuls left to
        # bitsandbytes: 1.50x a step at 8 x 1 on an H100, after ~25 s of compiling that a warm
        # trainer pays once and an in-process ClientApp every round (bench/round_levers/RESULTS.md).
        for layer in peft_model.get_base_model().model.layers:
            layer.compile()
    return peft_model


def _with_lora(model: PreTrainedModel, settings: ModelSettings) -> PeftModel:
    with peft_quietly():
        return get_peft_model(model, lora_config(settings))


@contextmanager
def peft_quietly() -> Iterator[None]:
    """PEFT reads transformers' deprecated `is_gradient_checkpointing` itself whenever it
    wraps a model: a FutureWarning per client per round that no caller of PEFT can avoid."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def initial_adapter(settings: ModelSettings, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default LoRA init (Kaiming-uniform A, zero B), with a seed every run repeats."""
    config = AutoConfig.from_pretrained(settings.name)
    with torch.device("meta"):
        skeleton = _with_lora(AutoModelForCausalLM.from_config(config), settings)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, meta in get_peft_model_state_dict(skeleton).items():
        tensor = torch.zeros(meta.shape, dtype=meta.dtype)
        if ".lora_A." in key:
            torch.nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)
        state[key] = tensor
    return state
