"""Small random LoRA adapters for the tiny test model, in PEFT's layout (adapter_config.json and
adapter_model.safetensors), written with torch and safetensors alone."""

from __future__ import annotations

import json
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def write_adapter(directory: Path, model: Path, seed: int, rank: int = 8, scale: float = 0.5) -> Path:
    """A rank-`rank` adapter on every attention projection of `model`, with weights large enough
    that its tokens differ from the base model's (and its KV: k_proj and v_proj change it)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    out = {
        "q_proj": config["num_attention_heads"] * head_dim,
        "k_proj": config["num_key_value_heads"] * head_dim,
        "v_proj": config["num_key_value_heads"] * head_dim,
        "o_proj": hidden,
    }
    inp = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": config["num_attention_heads"] * head_dim}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in TARGETS:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            a = torch.randn(rank, inp[target], generator=g) * scale
            b = torch.randn(out[target], rank, generator=g) * scale
            tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": str(model),
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "target_modules": list(TARGETS),
                "bias": "none",
                "fan_in_fan_out": False,
                "modules_to_save": None,
                "use_rslora": False,
                "use_dora": False,
            }
        )
    )
    return directory


def write_broken_adapter(directory: Path, model: Path) -> Path:
    """An adapter directory whose config is fine and whose weights file is not safetensors."""
    write_adapter(directory, model, seed=0)
    (directory / "adapter_model.safetensors").write_bytes(b"\x00\x01not safetensors at all")
    return directory
