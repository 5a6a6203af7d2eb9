"""Modal deployment of a mapping: one app per worker and one for the coordinator (``mole modal-deploy``).

``spec`` (plain data, tested) and ``serving`` import without ``modal``; only ``app`` (what
``modal deploy`` loads) and ``deploy`` at deploy time need the optional ``modal`` package.
"""
