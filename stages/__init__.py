"""One module per CLI stage, each a thin composition of the domain and storage floors."""
