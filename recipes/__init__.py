"""The recipes bundled with negmerge, shipped in the wheel as negmerge_cli.bundled_recipes."""
