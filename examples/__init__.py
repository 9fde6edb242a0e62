"""Programs that use fastopt (not part of the library): the main job (``demo.py``), SAGA on
scikit-learn's digits (``saga_digits.py``) and the lean-precision variants against fp32
(``precision.py``). Run from the repository root: ``python -m examples.demo``."""
