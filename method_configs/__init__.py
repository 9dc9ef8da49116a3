"""One module per registered nerfstudio method; each builds its TrainerConfig and nothing else."""

from ns_4d_methods.nerfstudio_startup import speed_up_startup

# nerfstudio imports this package while it lists the methods, before it builds its external-method placeholders.
speed_up_startup()
