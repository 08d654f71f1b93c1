"""Software-defined assets: thin wiring around the domain packages."""
