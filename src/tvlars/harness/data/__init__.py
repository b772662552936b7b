"""Data sets as whole uint8 splits, the loaders that batch them on the device, crop+flip augmentation."""
