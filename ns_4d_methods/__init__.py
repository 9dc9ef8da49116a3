"""ns-4d-methods: nerfstudio plugins for 4D scene reconstruction, editing and generation."""

from ns_4d_methods.checkpoint_compat import allow_numpy_scalars_in_checkpoints

allow_numpy_scalars_in_checkpoints()
