"""One module per registered nerfstudio method; each builds its TrainerConfig and nothing else.

Every ``ns-*`` command imports all of them to list the methods, so they import no diffusion or metric library:
diffusers, transformers' models and torchmetrics are imported inside the functions that use them (importing
``ns-train`` 8.4 -> 5.9 s of CPU time, measured on 2 loaded cores; tests/test_nerfstudio_startup.py keeps it so)."""

from ns_4d_methods.nerfstudio_startup import speed_up_startup

# nerfstudio imports this package while it lists the methods, before it builds its external-method placeholders.
speed_up_startup()
