"""Training side of the pipeline: data splits, the model, the training loop and the sweep.

Part of the ``[train]`` extra (scikit-learn, matplotlib): the merge core never imports it,
and the command line imports it only inside the commands that need it.
"""
