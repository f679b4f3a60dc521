"""Diffusion-SDPO: preference losses, the winner-preserving safeguard and the training parts."""
