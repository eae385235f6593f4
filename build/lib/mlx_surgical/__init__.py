"""mlx_surgical: surgical LoRA fine-tuning of Llama-family code models with Apple MLX."""

__version__ = "0.1.0"
