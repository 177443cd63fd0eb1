"""How good a model is and what it decides: classification figures, calibration error and the
prior correction (``metrics``), the decision and temperature fitted after training
(``calibration``), decision rules compared out-of-fold (``decisions``) and the blessing
gate's paired comparison with the champion (``gate``).

May import ``core``, ``data`` and ``model``.
"""
