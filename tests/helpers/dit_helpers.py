"""Shared helpers for the SD3 / Flux tests: the tiny pipelines, fixed inputs and their parts' outputs."""

from __future__ import annotations

import torch

from beyondlora.demos.tiny_dit_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

#: the pipeline attributes holding text encoders, per kind
TEXT_ENCODERS = {
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
}


def make_dit(kind: str, seed: int = 0):
    return tiny_flux_pipeline(seed) if kind == "flux" else tiny_sd3_pipeline(seed)


def transformer_inputs(pipe, kind: str) -> dict[str, torch.Tensor]:
    """Fixed random inputs of the transformer (latents, text states, pooled text, time)."""
    generator = torch.Generator().manual_seed(1)
    config = pipe.transformer.config

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    tokens = 6
    if kind == "flux":
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
        return {
            "hidden_states": rand(1, 16, config.in_channels),
            "encoder_hidden_states": rand(1, tokens, config.joint_attention_dim),
            "pooled_projections": rand(1, config.pooled_projection_dim),
            "timestep": torch.tensor([0.6]),
            "img_ids": ids.reshape(-1, 3),
            "txt_ids": torch.zeros(tokens, 3),
            "guidance": torch.tensor([3.5]),
        }
    return {
        "hidden_states": rand(1, config.in_channels, 8, 8),
        "encoder_hidden_states": rand(1, tokens, config.joint_attention_dim),
        "pooled_projections": rand(1, config.pooled_projection_dim),
        "timestep": torch.tensor([600.0]),
    }


@torch.no_grad()
def dit_outputs(pipe, kind: str) -> dict[str, torch.Tensor]:
    """Every text encoder's last hidden states for a fixed prompt and the transformer's output for fixed inputs."""
    out = {}
    for role in TEXT_ENCODERS[kind]:
        tokenizer = getattr(pipe, role.replace("text_encoder", "tokenizer"))
        ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=16, return_tensors="pt").input_ids
        out[role] = getattr(pipe, role)(ids).last_hidden_state
    out["transformer"] = pipe.transformer(**transformer_inputs(pipe, kind)).sample
    return out


def assert_close(actual: dict, expected: dict, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Equal to ``rtol`` relative to each output's largest magnitude (plus ``atol``)."""
    assert actual.keys() == expected.keys()
    for key in expected:
        error = (actual[key] - expected[key]).abs().max().item()
        bound = rtol * expected[key].abs().max().item() + atol
        assert error <= bound, f"{key}: max error {error:.3g} > {bound:.3g}"


def assert_changed(actual: dict, base: dict, by: float = 1e-3) -> None:
    for key in base:
        assert (actual[key] - base[key]).abs().max() > by, f"{key} did not change"


def adapter_layer_count(pipe, kind: str) -> int:
    parts = [pipe.transformer, *(getattr(pipe, r) for r in TEXT_ENCODERS[kind])]
    return sum(type(m).__name__ == "AdapterLayer" for part in parts for m in part.modules())
