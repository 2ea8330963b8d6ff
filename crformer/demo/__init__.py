"""A local web page to look at masks (``python -m crformer.demo``, the ``demo`` extra: gradio).

:mod:`crformer.demo.segment` computes what the page shows and needs no gradio; :mod:`crformer.demo.page`
lays it out; ``__main__`` checks the command line, loads the model and serves the page.
"""
