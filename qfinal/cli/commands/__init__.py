"""One module per command; each is a thin layer over the library."""
