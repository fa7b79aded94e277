"""The HTTP front the launcher runs on the public HTTP, metrics and health ports: it forwards to tritonserver's
private Unix sockets and answers KServe v2 HTTP itself, so no client byte reaches Triton's own HTTP parser."""
