"""The YAML configs shipped with the package (``slug_lightning.config_path``)."""
