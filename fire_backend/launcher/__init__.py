"""The ``fire serve`` process: starts tritonserver on private sockets, keeps its stubs healthy, supervises and
restarts it, and serves the HTTP front (:mod:`fire_backend.front`). Never imports the stub code or the builder."""
