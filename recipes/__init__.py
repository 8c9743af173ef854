"""The bundled recipes, shipped inside the package as `sleepctl.recipes` (see pyproject.toml)."""
