"""tvlars inside the training stacks people already use: timm's optimizer registry
(:mod:`tvlars.integrations.timm`, which imports timm: ``pip install "tvlars[timm]"``) and
Lightning's scheduler hook (:mod:`tvlars.integrations.lightning`). The Hugging Face Trainer
needs no module: README.md shows how to hand it tvlars's optimizer.
"""
