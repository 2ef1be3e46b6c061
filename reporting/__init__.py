"""Domain floor: training metrics, results and plots."""
