"""Top floor: the typer app, configuration, orchestration of the stages, the demo."""
