"""One-off migrations of committed model versions, kept to reproduce them; not part of training
or serving (`python -m training.migrations.<name>`)."""
