"""Domain floor: models."""
