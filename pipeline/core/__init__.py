"""pipeline.core: pure array kernels (co-registration, normalization, change)."""
