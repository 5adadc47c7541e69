"""Helpers shared by the quantization tests in tests/worker and tests/gpu (imported by this unique
name, like engine_helpers)."""

from __future__ import annotations

from typing import Any


def fp8_quantization_config(strategy: str = "channel") -> dict[str, Any]:
    """config.json's quantization_config of an llm-compressor FP8 checkpoint (compressed-tensors,
    float-quantized): e4m3 weights scaled per `strategy` ("channel" or "tensor"), dynamic per-token
    activations, lm_head left unquantized."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "type": "float",
                    "num_bits": 8,
                    "strategy": strategy,
                    "symmetric": True,
                    "dynamic": False,
                },
                "input_activations": {"type": "float", "num_bits": 8, "strategy": "token", "dynamic": True},
            }
        },
    }
