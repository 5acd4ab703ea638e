"""A performance model of the step loop: engine cost profiles fitted from the pools' counters
(``profiles``), an iteration-level simulator of the router and its pools (``simulator``), its check against
every committed GPU run (``validate``) and the capacity search on it (``search``). Pure Python and numpy: it
imports nothing from the serving code and no Ray, so it runs anywhere. ``docs/planning.md`` explains it.
"""
