"""Stage: make the model ready to use — eval/train mode, attention check, compile, training setup.

Runs after adapters and before validation. Running it twice changes nothing: every step checks
the state it wants before acting.
"""

from __future__ import annotations

import time

from qfinal.adapters.peft_model import base_model_of, is_peft_model, train_adapters
from qfinal.compat import transformers as _hf
from qfinal.pipeline.context import Context, Outcome
from qfinal.pipeline.stages.base import BaseStage
from qfinal.report import Finding


def parameter_counts(model) -> tuple[int, int]:
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def attention_in_use(model) -> str | None:
    """The attention implementation the model's attention modules will dispatch to.

    transformers picks the function per call from each attention module's own `config`, so every
    module holding a config is read, not just the top-level one: a sub-config left on another
    implementation shows up as "mixed: ..." (naming the odd modules) instead of passing unseen.
    """
    top = _hf.attn_implementation(getattr(model, "config", None))
    odd: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name.lower().endswith(("attn", "attention")):
            continue
        used = _hf.attn_implementation(getattr(module, "config", None))
        if used is not None and used != top:
            odd.setdefault(used, []).append(name)
    if not odd:
        return top
    parts = [f"{impl} ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})" for impl, names in sorted(odd.items())]
    return "mixed: " + ", ".join(parts + [str(top)])


class Runtime(BaseStage):
    name = "runtime"

    def run(self, ctx: Context) -> Outcome:
        rt = ctx.config.runtime
        model = ctx.model
        notes, findings = [], []

        if rt.mode == "inference":
            model.eval()
            notes.append("eval mode, dropout off")
        else:
            model.train()
            if is_peft_model(model):
                train_adapters(model)
                notes.append("train mode, base frozen, adapters trainable")
            else:
                notes.append("train mode")
        trainable, total = parameter_counts(model)
        ctx.report.extra["parameters"] = {"trainable": trainable, "total": total}

        used = attention_in_use(model)
        ctx.report.extra["attn_implementation"] = used
        if rt.attn_implementation is not None:
            fallback = ctx.attn_fallback
            if used == rt.attn_implementation:
                findings.append(
                    Finding(
                        check="attn_implementation",
                        severity="info",
                        message=f"requested {rt.attn_implementation}, in use",
                    )
                )
            else:
                why = f" ({fallback})" if fallback else ""
                findings.append(
                    Finding(
                        check="attn_implementation",
                        severity="warning",
                        message=f"requested {rt.attn_implementation} but the model runs {used}{why}",
                    )
                )
        notes.append(f"attention {used}")

        if rt.gradient_checkpointing:
            base = base_model_of(model)
            if not base.is_activation_checkpointing:
                base.activation_checkpointing_enable()
            notes.append("gradient checkpointing on")

        if rt.compile.enabled and not getattr(model, "_qfinal_compiled", False):
            start = time.perf_counter()
            model.compile(mode=rt.compile.mode)
            model._qfinal_compiled = True
            if rt.compile.warmup:
                import torch

                from qfinal.compare.outputs import probe_batch
                from qfinal.compat.bitsandbytes import cpu_repack_disabled

                with torch.no_grad(), cpu_repack_disabled(model):
                    model(**probe_batch(model))
            seconds = time.perf_counter() - start
            ctx.report.extra["compile_seconds"] = round(seconds, 3)
            notes.append(f"compiled ({rt.compile.mode}) in {seconds:.1f}s")

        ctx.report.findings.extend(findings)
        return Outcome("ran", f"{'; '.join(notes)}; {trainable:,}/{total:,} parameters trainable")
