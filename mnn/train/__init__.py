"""Training: one loop for every task (``loop``), then one file per task kind.

``classifier`` trains image classifiers (the MLP), ``language_model``
character language models (the GPT). A task says how to draw a batch, how to
take a step's gradients and how to evaluate; :func:`mnn.train.loop.run` does
the rest, the same way for every model.
"""
