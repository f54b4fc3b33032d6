"""Which transformers class to build: config override, else `architectures[0]`, else the task."""

from __future__ import annotations

from qfinal.compat.transformers import auto_model_class
from qfinal.compat.transformers_layout import architecture_class
from qfinal.errors import ConfigError, SourceError


def resolve_model_class(hf_config, model_class: str | None, task: str | None, where: str):
    import transformers

    if model_class:
        cls = getattr(transformers, model_class, None)
        if cls is None or not hasattr(cls, "from_pretrained"):
            raise ConfigError(
                f"unknown model class {model_class!r}",
                where="model_class",
                hint="use a transformers class name such as LlamaForCausalLM",
            )
        return cls
    if task:
        try:
            return auto_model_class(task, hf_config)
        except KeyError:
            raise ConfigError(
                f"model type {hf_config.model_type!r} has no {task} class",
                where="task",
                hint="pick another task or set model_class",
            ) from None
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise SourceError(
            "config.json has no 'architectures', so the model class is unknown",
            where=where,
            hint="set `task:` (e.g. causal-lm) or `model_class:` in the config",
        )
    name, cls = architecture_class(hf_config)
    if cls is None:
        raise SourceError(
            f"architecture {name!r} is not a transformers model class",
            where=where,
            hint="custom-code models need `trust_remote_code: true` in the config, or set model_class",
        )
    return cls
