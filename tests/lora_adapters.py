"""LoRA adapters for the small model, made on the spot with `peft`, for the LoRA tests and
`bench.lora`: no download, and weights that change what the model says."""

from pathlib import Path


def make_adapter(base: str, folder: Path, seed: int) -> None:
    """`base`: the model's checkpoint folder. `init_lora_weights=False` makes both matrices random
    (peft's default leaves one at zero: an adapter that changes nothing)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    adapter = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    adapter.save_pretrained(folder)
