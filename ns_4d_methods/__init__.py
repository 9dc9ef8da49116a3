"""ns-4d-methods: nerfstudio plugins for 4D scene reconstruction, editing and generation."""
