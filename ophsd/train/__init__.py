"""The OPHSD trainer: ``torchrun --nproc-per-node N -m ophsd.train [flags]``."""
