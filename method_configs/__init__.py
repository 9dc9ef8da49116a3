"""One module per registered nerfstudio method; each builds its TrainerConfig and nothing else."""
