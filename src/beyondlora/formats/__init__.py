"""Reading and writing adapter files."""
