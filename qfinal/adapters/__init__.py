"""PEFT adapters on a finalized base, every peft type, loaded with peft's own API and accounted for.

Modules: `prepare` (adapter folders, configs and names checked, the static refusals, tensors read),
`peft_types` (what each peft type adds and whether peft can merge it), `apply` (`apply_adapters`),
`coverage` (which file tensors landed, which targets matched nothing), `fit` (the adapter's task and
training base against this base), `merge` (merging, into quantized bases too), `peft_model` (is it a
peft wrapper, what does it wrap, what trains).
"""
