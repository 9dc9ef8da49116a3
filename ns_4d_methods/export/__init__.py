"""4D results out: per-frame 3DGS ``.ply`` (:mod:`.gaussians_ply`), single-file 4D splats for splaTV
(:mod:`.splatv`) and meshes (:mod:`.mesh`); pure functions of a trained model and times, called by ``ns-4d-export``
and the viewer's Export tab."""
