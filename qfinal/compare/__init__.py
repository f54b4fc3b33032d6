"""The one comparison engine: tensors, dequantized values and model outputs.

Used by `qfinal diff A B`, by `qfinal save`'s round-trip proof, by `dequantize --verify` and by
`qfinal load --quality`. Nothing here prints or exits; renderers (`qfinal.render`) read the
dataclasses. Modules: `tensors` (per-tensor maths, `Comparison` and its verdicts), `views` (what a
model holds, raw or dequantized), `outputs` (the probe batch and logits metrics), `models`
(`compare_models`), `layers` (`quality_by_layer`).

Conventions (stable, the tests pin them):

* **Direction.** `b` is the reference, `a` the candidate. `rel_error = ||a - b||_F / ||b||_F` and
  `kl_divergence = mean over positions of KL(p_b || p_a) = sum_v p_b (log p_b - log p_a)`, i.e. the
  information lost when the candidate's next-token distribution stands in for the reference's.
  Call `compare_models(quantized, original)`.
* **Arithmetic.** Every value metric is computed in float64 on CPU, in chunks, so a bf16 or int8
  tensor is never rounded before it is compared. `bit_identical` compares raw bits (NaN-aware:
  identical bits are identical, whatever their value).
* **Common layout.** Linear layout, `(out_features, in_features)`, what `nn.Linear` and bitsandbytes'
  `Linear4bit`/`Linear8bitLt` hold (transformers transposes GPT-2 style `Conv1D` weights when it
  quantizes them). `dequantized_state_dict` transposes every `Conv1D` weight into it. In raw mode
  (`dequantize=False`) tensors keep their stored layout; a `Conv1D` weight is transposed only to
  line up with the other side's known Linear weight (or, for a plain mapping whose layout is unknown,
  when only the transposed shape fits). A plain mapping is taken to be in the layout a model would
  present in the same mode: `dequantized_state_dict` output for `dequantize=True`, `raw_state_dict`
  output for `dequantize=False`.
* **Tied weights.** `raw_state_dict` is what `save_pretrained` persists, so tied aliases are dropped
  the way transformers drops them (`lm_head.weight` when it is tied to the embeddings);
  `dequantized_state_dict` uses the same key set, minus bitsandbytes' auxiliary keys.
"""
