"""What the tests and the benchmarks share, shipped with the package as TFDS ships its
``testing`` module: small audio fixtures written on the fly (``fixtures``), a GCS-API
server on 127.0.0.1 (``gcs_server``), the independent PyTorch re-implementation of the
release's model that parity is checked against (``torch_reference``) and a script run
with its memory measured (``memory``). Nothing in the library imports it (it is the top
of ``asda_jax.LAYERS``); ``torch_reference`` and ``gcs_server`` need the ``testing``
extra (``pip install asda-jax[testing]``, or requirements-dev.txt).
"""
