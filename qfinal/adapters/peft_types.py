"""peft adapter types: what each adds to the base and what peft can merge, judged from adapter_config.json.

Every peft type loads through the same `PeftModel.from_pretrained` / `load_adapter` (LoRA and its
DoRA / rsLoRA variants, AdaLoRA, IA3, LoHa, LoKr, ..., prompt tuning, prefix tuning, p-tuning). Some
cannot merge: prompt learning adds virtual tokens (or per-layer prefix key/values), adaption prompt
adds gated attention prompts, and a few tuners have no weight delta to fold in; peft's
`merge_and_unload` does not exist for them (an AttributeError) or raises. Asking to merge one is
refused from its adapter_config.json alone (`adapter_refusal`), as are the combinations peft's
bitsandbytes layers cannot do.
"""

from __future__ import annotations

from qfinal.errors import ConfigError

# peft types that cannot merge although their tuner has a `merge_and_unload` (peft 0.21): POLY's
# layers have no `merge` (NotImplementedError), SHADOW's `_check_merge_allowed` always raises.
# Types without a tuner `merge_and_unload` (prompt learning, adaption prompt) are found in peft.
_NO_MERGE = {"POLY", "SHADOW"}
PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "CPT", "CARTRIDGE"}
# peft's merge into bitsandbytes weights (merge_requantize) fails for these (peft 0.21.2, bnb 0.50.2):
# AdaLoRA's SVDLinear4bit/8bit merge raises NotImplementedError, IA3 refuses 4/8-bit, LoHa/LoKr add a
# float delta to the packed integer weight
_NO_BNB_MERGE = {"ADALORA", "IA3", "LOHA", "LOKR"}
# ... and these cannot even run on a 4-bit layer: the LyCORIS layers take the packed weight's shape
_NO_BNB_4BIT = {"LOHA", "LOKR"}
_FOUR_BIT = ("nf4", "fp4", "4-bit")
# peft builds these layers from the base weights when it injects them (an SVD of the weight: OSF,
# PSOFT; FROD likewise): `qfinal merge` injects into a hollow base, so it would merge a different
# adapter. They merge in memory (`save`/`load --merge`), where peft sees the real weights.
_BASE_AT_INJECTION = {"FROD", "OSF", "PSOFT"}


def streaming_merge_refusal(peft_type: str) -> str | None:
    """Why `qfinal merge` (adapters injected into a hollow base) cannot merge `peft_type`, or None."""
    if peft_type in _BASE_AT_INJECTION:
        return (
            f"peft builds {peft_type} layers from the base weights as it injects them; the streaming "
            "merge never holds those weights"
        )
    return None


def known_peft_types():
    """peft type -> its config class, for the installed peft."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    return PEFT_TYPE_TO_CONFIG_MAPPING


def mergeable(peft_type: str) -> bool:
    """Whether peft can merge an adapter of `peft_type` into the base weights (`merge_and_unload`)."""
    if peft_type in _NO_MERGE or peft_type in PROMPT_LEARNING:
        return False
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    return tuner is not None and hasattr(tuner, "merge_and_unload")


def injects(peft_type: str) -> bool:
    """Whether peft wraps the modules `target_modules` matches (a BaseTuner), as LoRA does; adaption
    prompt's `target_modules` names an attribute instead."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.tuners.tuners_utils import BaseTuner

    tuner = PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type)
    return isinstance(tuner, type) and issubclass(tuner, BaseTuner)


def variants(config: dict) -> list[str]:
    """The LoRA variants an adapter_config.json switches on: DoRA, rsLoRA."""
    names = {"use_dora": "DoRA", "use_rslora": "rsLoRA"} if config.get("peft_type") == "LORA" else {}
    return [label for key, label in names.items() if config.get(key)]


def virtual_tokens(config: dict) -> int:
    """Prompt learning: the virtual tokens put before the input; adaption prompt: its length; else 0."""
    if config["peft_type"] in PROMPT_LEARNING:
        return config.get("num_virtual_tokens") or 0
    if config["peft_type"] == "ADAPTION_PROMPT":
        return config.get("adapter_len") or 0
    return 0


def describe(config: dict) -> str:
    """'LORA (DoRA)', 'PROMPT_TUNING (5 virtual tokens)': the type and what it adds, for messages."""
    extra = variants(config) or (
        [f"{config['num_virtual_tokens']} virtual tokens"] if config.get("num_virtual_tokens") else []
    )
    return config["peft_type"] + (f" ({', '.join(extra)})" if extra else "")


def quant_met(quant: str | None, merges: list[bool], requantize: bool) -> str | None:
    """The quantization the adapters meet: none once a merge dequantizes the base first."""
    return None if quant and any(merges) and not requantize else quant


def adapter_refusal(
    config: dict, *, name: str, where: str, merge: bool, quant: str | None, requantize: bool
) -> ConfigError | None:
    """The error for an adapter peft cannot apply as asked, judged from its adapter_config.json
    (`quant`: the base's bitsandbytes format when the adapter meets it, else None); None if it can."""
    peft_type = config["peft_type"]
    if merge and not mergeable(peft_type):
        return ConfigError(
            f"adapter '{name}' is {describe(config)}, which peft cannot merge into the base weights",
            where=where,
            hint="load it unmerged (without --merge, or merge: false for this adapter)",
        )
    if merge and quant and requantize and peft_type in _NO_BNB_MERGE:
        return ConfigError(
            f"adapter '{name}' is {peft_type}, which peft cannot merge into {quant} weights",
            where=where,
            hint="drop merge_requantize (the base is dequantized, then merged), or load it unmerged",
        )
    if not merge and quant in _FOUR_BIT and peft_type in _NO_BNB_4BIT:
        return ConfigError(
            f"adapter '{name}' is {peft_type}, whose peft layers cannot run on a {quant} base",
            where=where,
            hint="merge it (the base is dequantized first), or load the base unquantized or in int8",
        )
    return None
