"""Reference models: the world action model and its named, swappable pieces."""
