"""Integrations with Stable Diffusion tooling: diffusers pipelines and kohya sd-scripts."""
