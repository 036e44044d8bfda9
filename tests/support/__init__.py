"""Shared test support: the process harness (:mod:`support.procs`), the bus tests' helper process and message
types (:mod:`support.busapp`), and synthetic planning problems (:mod:`support.synthetic`).

Importable as ``support`` because pyproject's ``[tool.pytest.ini_options] pythonpath`` lists tests/.
"""
