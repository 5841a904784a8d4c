"""Step 1, decide: the model definition (``model``), quantization (``quant``), the bundle format
(``bundle``), the inference backends (``backends``) and the :class:`~cogbert_edge.Policy` API
(``policy``). Public names are re-exported by :mod:`cogbert_edge`."""
