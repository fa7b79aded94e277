"""The direction store on etcd (``etcd://host:port/prefix``): a stdlib client for etcd's v3 JSON gateway, the
store (compare-and-set commits of content-addressed, checksummed versions), and the follower thread each repair
instance runs. Chosen over Redis in docs/store-engine.md; the file store stays the embedded default."""
