"""The `kl-autoencoder` commands, one module each (named as the command, `sample-photos` as sample_photos.py), on
the options and helpers they share (common.py). cli.py, above them, builds the parser and runs one."""
