"""SafeSteer: safety alignment by localized on-policy distillation from a steered self-teacher."""

__version__ = "0.1.0"
