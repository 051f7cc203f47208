"""ophsd: On-Policy Harness Self-Distillation trainer."""

__version__ = "0.1.0"
