"""The wire contract and the clients that speak it: torch-free (numpy and tritonclient only).

``names`` (models, tensors, the bypass parameter, ports), ``token`` (the control token's one reader),
``endpoints`` (the URL parser), ``errors`` (the one tritonclient error translation), ``connection`` (one
tritonclient connection), ``images`` (loading and converting images), ``client`` (inference) and ``control``
(the control endpoint). Import the submodule you need; this package imports nothing.
"""
