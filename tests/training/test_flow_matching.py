"""Flow matching for SD3 and Flux, checked against diffusers' own pieces: the schedulers' shifts, Flux's
token packing and position ids, and the transformers called the way their pipelines call them."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import beyondlora as bl
from beyondlora.training.flow_matching import image_ids, pack_latents, shifted_sigmas, unpack_latents
from beyondlora.training.models import load_base_model

SIGMAS = [0.9, 0.6, 0.35, 0.1, 0.02]


def test_a_fixed_shift_is_the_schedulers() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=SIGMAS)
    ours = shifted_sigmas(torch.tensor(SIGMAS), scheduler.config, tokens=4096)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tokens", [256, 1024, 4096])
def test_a_dynamic_shift_is_the_flux_pipelines(tokens: int) -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    scheduler.set_timesteps(sigmas=SIGMAS, mu=mu)
    ours = shifted_sigmas(torch.tensor(SIGMAS), scheduler.config, tokens)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-6, atol=1e-7)


def test_packing_and_position_ids_are_fluxs() -> None:
    latents = torch.randn(2, 4, 6, 10)
    packed = pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 2, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(packed, 6, 10), latents, rtol=0, atol=0)
    # the pipeline takes the packed grid's size (half the latent size per side)
    theirs = FluxPipeline._prepare_latent_image_ids(2, 3, 5, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(image_ids(6, 10, torch.device("cpu"), torch.float32), theirs, rtol=0, atol=0)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_the_loss_is_the_velocity_error_of_the_pipelines_call(model: str) -> None:
    """The objective's loss equals ‖v − (ε − x₀)‖² with the transformer called as its pipeline calls it."""
    base = load_base_model(model, torch.device("cpu"))
    objective, transformer = base.objective, base.pipe.transformer
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    times = torch.tensor([0.3, 0.8])
    states, pooled = objective.embed(base, base.text_encoders, ["a red circle", "a blue square"])
    with torch.no_grad():
        losses = objective.losses(transformer, latents, noise, times, (states, pooled))
        sigma = shifted_sigmas(times, base.scheduler.config, 16)
        noisy = (1 - sigma[:, None, None, None]) * latents + sigma[:, None, None, None] * noise
        if model == "tiny-flux":
            ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, torch.device("cpu"), torch.float32)
            out = transformer(
                hidden_states=FluxPipeline._pack_latents(noisy, 2, 4, 8, 8),
                timestep=sigma,  # the pipeline passes t / 1000
                guidance=torch.full((2,), 1.0),
                pooled_projections=pooled,
                encoder_hidden_states=states,
                txt_ids=torch.zeros(states.shape[1], 3),
                img_ids=ids,
            ).sample
            out = FluxPipeline._unpack_latents(out, 64, 64, 8)
        else:
            out = transformer(
                hidden_states=noisy, timestep=1000 * sigma, encoder_hidden_states=states, pooled_projections=pooled
            ).sample
    expected = ((out - (noise - latents)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["tiny-sd3", "tiny-flux"])
def test_samples_are_the_pipelines_own(model: str) -> None:
    """Sampling goes through the pipeline: with the same seeds it gives the pipeline's latents; a seed
    gives the same image whatever else is in the batch."""
    base = load_base_model(model, torch.device("cpu"))
    ours = base.objective.sample(base, base.text_encoders, ["a red circle", "a red circle"], [3, 4], 64, 2, 2.0)
    again = base.objective.sample(base, base.text_encoders, ["a red circle"], [4], 64, 2, 2.0)
    torch.testing.assert_close(ours[1:], again, rtol=1e-5, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3
    theirs = base.pipe(
        "a red circle",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(3),
        output_type="latent",
        **({"max_sequence_length": base.objective.max_text_tokens}),
    ).images
    if model == "tiny-flux":
        theirs = unpack_latents(theirs, 8, 8)
    torch.testing.assert_close(ours[:1], theirs, rtol=1e-4, atol=1e-5)


def test_tiny_dit_bases_train_their_transformer() -> None:
    for model in ("tiny-sd3", "tiny-flux"):
        base = load_base_model(model, torch.device("cpu"))
        assert base.denoiser is base.pipe.transformer and not base.is_xl
        assert base.resolution == 64 and base.scale_factor == 8
    assert isinstance(bl.tiny_flux_pipeline().transformer, torch.nn.Module)
