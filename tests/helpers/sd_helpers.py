"""Shared helpers for the Stable Diffusion tests: fixed inputs, part outputs, hand-made adapter files and
what a UI computes from them (independently of the library's naming and codecs)."""

from __future__ import annotations

import torch
from torch import nn

from beyondlora.demos.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from helpers.ui_formula import ui_delta


def make_pipeline(kind: str, seed: int = 0):
    return tiny_sdxl_pipeline(seed) if kind == "sdxl" else tiny_sd_pipeline(seed)


def part_outputs(pipe, kind: str) -> dict[str, torch.Tensor]:
    """Text-encoder hidden states and the UNet's noise prediction for fixed inputs."""
    ids = pipe.tokenizer(["a photo of a cat"], padding="max_length", return_tensors="pt").input_ids
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True)
        out = {"text_encoder": first.hidden_states[-1]}
        kwargs = {}
        cond = first.hidden_states[-2]
        if kind == "sdxl":
            second = pipe.text_encoder_2(ids, output_hidden_states=True)
            out["text_encoder_2"] = second.hidden_states[-1]
            out["text_embeds"] = second.text_embeds
            cond = torch.cat([cond, second.hidden_states[-2]], dim=-1)
            time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
            kwargs["added_cond_kwargs"] = {"text_embeds": second.text_embeds, "time_ids": time_ids}
        dtype = next(pipe.unet.parameters()).dtype
        out["unet"] = pipe.unet(latents.to(dtype), 500, encoder_hidden_states=cond.to(dtype), **kwargs).sample
    return out


def assert_outputs_close(actual: dict, expected: dict, rtol: float = 1e-4, atol: float = 2e-5) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def assert_changed(actual: dict, base: dict, keys: list[str], by: float = 1e-3) -> None:
    for key in keys:
        assert (actual[key] - base[key]).abs().max() > by, f"{key} did not change"


def canonical_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.detach().double()


def random_params(spec: dict, weight: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random single-file tensors of one module, written from the format description (shapes by hand).

    ``spec``: ``{"algo": ..., "r": ..., "alpha": ..., "a": ..., "c": ..., "tucker": ..., ...}``.
    """

    def rand(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    out_dim, in_dim, kernel = weight.shape[0], weight.shape[1], tuple(weight.shape[2:])
    k = int(torch.tensor(kernel).prod()) if kernel else 1
    algo, r = spec["algo"], spec.get("r", 2)
    params: dict[str, torch.Tensor] = {}
    if algo == "lora":
        if spec.get("tucker"):
            params["lora_down.weight"] = rand(r, in_dim, *([1] * len(kernel)))
            params["lora_mid.weight"] = rand(r, r, *kernel)
        else:
            params["lora_down.weight"] = rand(r, in_dim, *kernel)
        params["lora_up.weight"] = rand(out_dim, r, *([1] * len(kernel)))
    elif algo == "loha":
        for n in ("1", "2"):
            params[f"hada_w{n}_a"] = rand(out_dim, r, std=0.5)
            params[f"hada_w{n}_b"] = rand(r, in_dim * k, std=0.5)
    elif algo == "lokr":
        a, c = spec["a"], spec["c"]
        b, d = out_dim // a, in_dim // c
        if spec.get("w1_decomposed"):
            params["lokr_w1_a"], params["lokr_w1_b"] = rand(a, r, std=0.5), rand(r, c, std=0.5)
        else:
            params["lokr_w1"] = rand(a, c, std=0.5)
        if spec.get("w2_full"):
            params["lokr_w2"] = rand(b, d, *kernel)
        else:
            params["lokr_w2_a"], params["lokr_w2_b"] = rand(b, r, std=0.5), rand(r, d * k, std=0.5)
    elif algo == "ia3":
        on_input = spec.get("on_input", False)
        params["weight"] = rand(in_dim if on_input else out_dim)
        params["on_input"] = torch.tensor(int(on_input))
    elif algo == "glora":
        ones = [1] * len(kernel)
        params["a1.weight"], params["a2.weight"] = rand(in_dim, r, *ones), rand(r, in_dim, *ones, std=0.1)
        params["b1.weight"], params["b2.weight"] = rand(out_dim, r, *ones), rand(r, in_dim, *kernel, std=0.1)
    elif algo == "full":
        params["diff"] = rand(*weight.shape, std=0.05)
        params["diff_b"] = rand(out_dim, std=0.05)
    elif algo in ("oft", "boft"):  # blocks of b: (n, b, b), BOFT (stages, n, b, b); alpha is the constraint
        b = spec["b"]
        stages = (spec["stages"],) if algo == "boft" else ()
        params["oft_blocks"] = rand(*stages, out_dim // b, b, b, std=0.1)
        params["alpha"] = torch.tensor(float(spec.get("constraint", 0.0)))
        if spec.get("rescaled"):
            params["rescale"] = 1 + rand(out_dim, *([1] * (weight.dim() - 1)), std=0.1)
    if algo in ("lora", "loha", "lokr", "glora"):
        params["alpha"] = torch.tensor(float(spec.get("alpha", r)))
    return params


def build_file(pipe, entries: dict[str, tuple[str, str, dict]], seed: int = 0) -> tuple[dict, dict]:
    """File tensors for ``{file key: (part, module name, spec)}``, and per key its params."""
    generator = torch.Generator().manual_seed(seed)
    tensors, by_key = {}, {}
    for key, (part, name, spec) in entries.items():
        module = getattr(pipe, part).get_submodule(name)
        params = random_params(spec, canonical_weight(module), generator)
        by_key[key] = params
        tensors.update({f"{key}.{n}": t.float() if t.is_floating_point() else t for n, t in params.items()})
    return tensors, by_key


@torch.no_grad()
def apply_like_a_ui(pipe, entries: dict, by_key: dict, multiplier: float) -> None:
    """Patch the weights the way ComfyUI / A1111 do: W += strength · ΔW (and the bias for full diffs)."""
    for key, (part, name, _) in entries.items():
        module = getattr(pipe, part).get_submodule(name)
        weight = canonical_weight(module)
        delta, bias = ui_delta({n: t.float() for n, t in by_key[key].items()}, weight)
        module.weight += (multiplier * delta).to(module.weight.dtype)
        if bias is not None:
            module.bias += (multiplier * bias).to(module.bias.dtype)


def adapter_layer_count(pipe) -> int:
    parts = [getattr(pipe, p) for p in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, p, None) is not None]
    return sum(type(m).__name__ == "AdapterLayer" for part in parts for m in part.modules())
