"""Domain floor: data."""
