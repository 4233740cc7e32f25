class CheckpointError(ValueError):
    """A checkpoint, config or tokenizer file that cannot be used as it is; the message names the file and key."""
