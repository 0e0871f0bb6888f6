"""Memory of SD3/Flux adapter training: measured on the tiny offline models, computed for the real ones.

Measured (tiny models, one training step of the transformer with LoRA r=16 on every Linear of its blocks):
the base's weight bytes in each ``--base-precision``, the adapter's parameters and AdamW state, and the
activations kept for backward (summed by a saved-tensor hook) with and without gradient checkpointing.

Computed (FLUX.1-dev's and SD 3.5 Large's transformer configs instantiated on the meta device, so the
parameter counts are exact): weights at each storage, the LoRA's parameters with AdamW, and the activations
kept with gradient checkpointing at 1024² — each block's input, (image + text tokens) × width × 2 bytes in
bf16, plus one block's recomputation (about 20 such tensors: q, k, v, attention output, the 4× MLP).

    python scripts/dit_memory.py
"""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

import beyondlora as bl
from beyondlora.training.flow_matching import FlowMatching
from beyondlora.training.storage import store_weights

GB = 1e9
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp"]
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)  # fmt: skip
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
                  num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")  # fmt: skip


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


def adapter_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def saved_bytes(pipe, checkpointing: bool) -> int:
    """Bytes autograd keeps for backward in one step of the adapted tiny transformer (unique storages)."""
    transformer = pipe.transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    base = type("Base", (), {"pipe": pipe, "denoiser": transformer, "text_encoders": []})()
    flux = type(pipe).__name__ == "FluxPipeline"
    objective = FlowMatching(dict(pipe.scheduler.config), flux, flux, 16)
    states, pooled = objective.embed(base, [], ["a red circle", "a blue square"])
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = objective.losses(transformer, latents, noise, torch.tensor([0.3, 0.7]), (states, pooled)).mean()
    loss.backward()
    transformer.disable_gradient_checkpointing()
    return sum(seen.values())


def measured() -> None:
    print("| tiny model | storage | base weights | LoRA params (+ AdamW) | kept for backward | with checkpointing |")
    print("|---|---|---|---|---|---|")
    for name, build in (("tiny-flux", bl.tiny_flux_pipeline), ("tiny-sd3", bl.tiny_sd3_pipeline)):
        for precision in ("fp32", "bf16", "fp8"):
            pipe = build()
            pipe.transformer.requires_grad_(False)
            store_weights(pipe.transformer, precision)
            stored = weight_bytes(pipe.transformer)
            bl.get_peft_model(pipe.transformer, bl.LoraConfig(r=16, target_modules=TARGETS))  # adapts in place
            lora = adapter_params(pipe.transformer) * 4 * 3  # float32 values, AdamW's two moments
            cells = ["", ""]
            if precision == "fp32":
                cells = [f"{saved_bytes(pipe, False) / 1e6:.2f} MB", f"{saved_bytes(pipe, True) / 1e6:.2f} MB"]
            print(f"| {name} | {precision} | {stored / 1e6:.2f} MB | {lora / 1e6:.2f} MB | {cells[0]} | {cells[1]} |")


def computed() -> None:
    print()
    print("| model | parameters | fp32 | bf16 | fp8 | LoRA r=16 (+ AdamW) | checkpointed activations, 1024² bf16 |")
    print("|---|---|---|---|---|---|---|")
    for name, cls, config, blocks, width, text in (
        ("FLUX.1-dev", FluxTransformer2DModel, FLUX_DEV, 57, 3072, 512),
        ("SD 3.5 Large", SD3Transformer2DModel, SD35_LARGE, 38, 2432, 333),
    ):
        with torch.device("meta"):
            model = cls(**config)
        count = sum(p.numel() for p in model.parameters())
        rank = 16
        lora = sum(
            rank * (m.in_features + m.out_features)
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and n.rsplit(".", 1)[-1] in {t.rsplit(".", 1)[-1] for t in TARGETS} | {"0"}
        )
        tokens = 4096 + text  # a 1024² image is 64 × 64 latent patches
        activations = (blocks + 20) * tokens * width * 2
        print(
            f"| {name} | {count / 1e9:.2f} B | {4 * count / GB:.1f} GB | {2 * count / GB:.1f} GB | {count / GB:.1f} GB "
            f"| {12 * lora / GB:.2f} GB | {activations / GB:.2f} GB |"
        )


if __name__ == "__main__":
    torch.manual_seed(0)
    measured()
    computed()
