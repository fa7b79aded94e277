"""What runs inside tritonserver's Python-backend stubs: the stages (fused, inline, head, repair, tail, monolithic,
control), the live repair plan each repair instance follows, the control endpoint's logic, and the metrics a stub
serves. Imports neither the launcher (:mod:`fire_backend.launcher`) nor the repository builder
(:mod:`fire_backend.repository.build`): a stub reads a built repository through :mod:`fire_backend.repository.layout`
alone (tests/unit/test_layout.py holds the rule)."""
