"""tvlars inside the training stacks people already use: timm's optimizer registry
([tvlars.integrations.timm][], which imports timm: ``pip install "tvlars[timm]"``) and
Lightning's scheduler hook ([tvlars.integrations.lightning][]). The Hugging Face Trainer
needs no module: the documentation's Hugging Face Trainer guide (docs/guides/huggingface.md)
shows how to hand it tvlars's optimizer.
"""
