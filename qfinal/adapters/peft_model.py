"""The one place that says whether a model is a peft wrapper, what it wraps, and what of it trains.

Recognised by its attributes, so that asking costs no peft import for a plain model.
"""

from __future__ import annotations


def is_peft_model(model) -> bool:
    """Whether `model` is a peft `PeftModel` (of any task), as opposed to a transformers model."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def base_model_of(model):
    """The transformers model under a peft wrapper (whose parameter names carry a prefix); `model` itself
    when it is not wrapped."""
    return model.get_base_model() if is_peft_model(model) else model


def train_adapters(peft_model) -> None:
    """Make trainable what peft makes trainable when each loaded adapter is loaded with
    `is_trainable=True`: every adapter's own weights (of any peft type) and its modules_to_save copies.

    peft froze the base when it wrapped it (leaving trainable what the adapter's `bias` option asks);
    that stays as it is. A saved prompt-learning adapter cannot be loaded trainable (peft refuses); its
    prompt encoder is made trainable as `get_peft_model` leaves it for training, the base frozen.
    """
    names = list(peft_model.peft_config)
    config = peft_model.active_peft_config
    if config.is_prompt_learning:
        from peft.tuners.tuners_utils import set_requires_grad

        for name in names:
            peft_model.prompt_encoder[name].requires_grad_(True)
        set_requires_grad(peft_model, names)  # modules_to_save copies
    elif config.is_adaption_prompt:
        from peft.tuners.adaption_prompt.utils import is_adaption_prompt_trainable

        for name, param in peft_model.named_parameters():
            if is_adaption_prompt_trainable(name):
                param.requires_grad_(True)
    else:
        peft_model.set_requires_grad(names)
