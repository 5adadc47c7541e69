"""Low-precision weights: FP8 (W8A8), INT8 weight-only and GPTQ 4-bit (see docs/quantization.md).

- `spec`: which method a worker runs, from `--quantization` and the checkpoint's quantization_config
  (torch-free: the config layer imports it);
- `fp8`, `int8`, `gptq`: the math of each method (a pure-torch reference that runs on CPU) and its
  linear method, which `layers.linear.Linear` delegates to;
- `gptq_quantizer`, `calibrate`: GPTQ itself and `inferfleet-worker quantize`;
- `evaluate`: logits of fixed prompts and their error against another model.
"""
