"""Callbacks that watch a model trained by someone else's loop.

``huggingface.AttnscopeCallback`` (a ``transformers`` ``TrainerCallback``) and
``lightning.AttnscopeCallback`` (a PyTorch Lightning ``Callback``) start a dashboard
on the trained model and mark each step with the logged loss. Import the one you
need from its module: this package imports neither library.
"""
