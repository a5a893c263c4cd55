"""The `slopbox` command."""
