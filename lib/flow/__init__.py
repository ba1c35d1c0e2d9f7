"""Flow / diffusion formulations (interfaces) and samplers."""
