"""Self-supervised learning: ``tvlars ssl`` (Barlow Twins), its two-view augmentation and evaluation."""
