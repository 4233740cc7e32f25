"""Training: the run config, the one trainer loop, one file per trainer, and the CLI (`__main__`)."""
