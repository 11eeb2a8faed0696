"""Cross toolchain descriptions (TOML data files), installed inside the package."""
