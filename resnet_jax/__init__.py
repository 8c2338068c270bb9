def __getattr__(name: str):
    """Lazy `resnet_jax.load` (see resnet_jax.inference): importing the package stays cheap."""
    if name == "load":
        from resnet_jax.inference import load

        return load
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")
