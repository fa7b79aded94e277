"""The module path that repositories built before the by-process layout name in their ``model.py`` files
(``fire_backend.serving.triton_models``): kept so they keep loading. New code lives in :mod:`fire_backend.stub`."""
