"""Training the shipped tiny model: the procedural world, the VAE and transformer trainers."""
