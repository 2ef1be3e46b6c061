"""Domain floor: loss."""
