"""One loaded configuration (Runtime): built whole from the config, swapped whole on reload."""
